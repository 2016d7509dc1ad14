# photoprep: `make run` builds the demo pipeline, `make test` runs the tests.
# Both create .venv on a fresh machine (Python 3.11) and install what they need.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch lies on local disk here; plain `torch` would pull a CUDA build.
TORCH  ?= torch==2.13.0
# `make test` runs pytest on this many processes (pytest-xdist), each test module whole on one of
# them, so a module's fixtures (a demo run, a DVC repository) are built once. xdist hands out the
# modules with many tests first; starting the few long ones first ran them side by side instead
# and took longer (pytest 19 min 10 s against 17 min 50 s on this 2-core machine).
TEST_WORKERS ?= 2

.PHONY: run sweep test check lint format typecheck install install-test bench clean help

help:
	@echo "make run    - set up .venv and run the whole pipeline on the embedded demo (dvc repro)"
	@echo "make sweep  - queue a grid of DVC experiments (SWEEP=...), run them on one worker, rank them"
	@echo "make test   - set up .venv with test extras, run make check, then pytest"
	@echo "make check  - ruff lint, ruff format --check and mypy (what CI runs before the tests)"
	@echo "make format - apply ruff's fixes and formatting"
	@echo "make bench  - run the benchmarks in bench/"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "photoprep: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Done. Results:"
	@echo "  one page:      reports/index.html   (open it in a browser; the funnel, every report, every metric)"
	@echo "  funnel:        reports/funnel.json   ($(BIN)/dvc metrics show)"
	@echo "  duplicates:    reports/duplicates.csv, reports/duplicates.png"
	@echo "  broken files:  reports/broken.csv"
	@echo "  resolutions:   plots/resolutions.png ($(BIN)/dvc plots show)"
	@echo "  dataset:       data/processed/, data/features/, data/splits/, reports/splits.json"
	@echo "  model:         models/model.pt; metrics/eval.json (test split), metrics/perf.json, dvclive/"
	@echo "  predictions:   reports/predictions.png, reports/misclassified.png, plots/confusion.csv"
	@echo "  inside model:  reports/tsne.png (plots/tsne.csv), reports/filters.png, reports/top5.png"
	@echo "  labelling:     data/predictions.parquet, metrics/predict.json, reports/predicted.png"
	@echo "  clusters:      reports/clusters.html, metrics/cluster.json (DEC beside two k-means baselines)"
	@echo "  review:        $(BIN)/photoprep review export --by cluster review/   (see README: the review loop)"

# A grid of DVC experiments: every combination of the -S values, queued, run by one worker,
# then ranked by test accuracy. Override the grid: make sweep SWEEP="-S 'train.dropout=0,0.2,0.5'"
SWEEP ?= -S 'train.model=mlp,smallcnn,convnet,timm/resnet18' -S 'train.lr=0.001,0.003' -S train.epochs=5
SWEEP_JOBS ?= 1

sweep: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --queue $(SWEEP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc queue start -j $(SWEEP_JOBS)
	@while $(BIN)/dvc queue status | grep -qE '\b(Queued|Running)\b'; do sleep 10; done
	$(BIN)/dvc queue status
	$(BIN)/dvc exp show --no-pager --only-changed --sort-by metrics/eval.json:accuracy --sort-order desc

test: check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

check: lint typecheck

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/mypy

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/download.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/cluster.py

clean:
	rm -rf .photoprep
