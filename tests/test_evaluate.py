"""The train and evaluate stages, run as DVC runs them, and the metrics they leave behind."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import make_workspace, one_thread  # noqa: F401 (an autouse fixture)

from photoprep.core.errors import UserError
from photoprep.core.layout import Layout
from photoprep.learn import checkpoint, evaluate, predict

REPO = Path(__file__).resolve().parents[1]
PARAMS = """\
train:
  model: convnet
  width: 8
  epochs: 10
  batch_size: 16
  lr: 0.02
  dropout: 0.0
  label_smoothing: 0.0
  device: cpu
evaluate:
  batch_size: 128
  samples: 20
  misclassified: 20
"""
WALL_CLOCK_WORDS = ("second", "time", "per_s", "throughput", "device")


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    return done


def trained_workspace(root: Path) -> Path:
    """A digits workspace after `dvc repro` of train and evaluate (the stage scripts, as DVC runs them)."""
    make_workspace(root, n=600, size=32)
    (root / "params.yaml").write_text(PARAMS)
    run_stage("train", root)
    run_stage("evaluate", root)
    return root


def shared_pipeline(tmp_path_factory) -> Path:
    """One trained and evaluated workspace per test session (the verify tests copy it)."""
    root = tmp_path_factory.getbasetemp() / "shared-pipeline"
    if not (root / "metrics/eval.json").exists():
        root.mkdir(exist_ok=True)
        trained_workspace(root)
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return shared_pipeline(tmp_path_factory)


def test_train_stage_writes_the_model_and_dvclive_curves(ws):
    blob = torch.load(ws / "models/model.pt", weights_only=True)
    assert blob["meta"]["classes"] == [str(d) for d in range(10)]
    assert (ws / "models/checkpoints/last.pt").exists() and (ws / "models/checkpoints/best.pt").exists()
    assert len((ws / "dvclive/plots/metrics/val/accuracy.tsv").read_text().splitlines()) == 1 + 10
    assert not (ws / "dvclive/dvc.yaml").exists() and not (ws / "dvc.yaml").exists()
    perf = json.loads((ws / "reports/train_perf.json").read_text())
    assert perf["train_seconds"] > 0 and perf["device"].startswith("cpu")


def test_eval_json_has_the_listed_metrics_and_no_wall_clock(ws):
    metrics = json.loads((ws / "metrics/eval.json").read_text())
    test = pd.read_parquet(ws / "data/splits/test.parquet")
    splits = json.loads((ws / "reports/splits.json").read_text())
    for key in ("accuracy", "top5_accuracy", "f1_macro", "f1_weighted", "loss"):
        assert 0 <= metrics[key] <= (10 if key == "loss" else 1), key
    assert metrics["accuracy"] > 0.2  # ten tiny epochs of a width-8 convnet on 420 images; chance is 0.1
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    assert metrics["n_test"] == len(test)
    assert metrics["test_fingerprint"] == splits["fingerprints"]["test"]
    model, _ = checkpoint.load_model(ws / "models/model.pt")
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert list(metrics["per_class"]) == splits["classes"]
    assert sum(c["support"] for c in metrics["per_class"].values()) == len(test)
    assert set(metrics["per_class"]["3"]) == {"precision", "recall", "f1", "support"}
    text = (ws / "metrics/eval.json").read_text()
    assert not any(word in text for word in WALL_CLOCK_WORDS)
    floats = [v for v in evaluate_leaves(metrics) if isinstance(v, float)]
    assert all(round(v, 6) == v for v in floats)


def evaluate_leaves(data):
    if isinstance(data, dict):
        for value in data.values():
            yield from evaluate_leaves(value)
    else:
        yield data


def test_perf_json_holds_training_time_and_evaluation_throughput(ws):
    perf = json.loads((ws / "metrics/perf.json").read_text())
    assert perf["train"]["train_seconds"] > 0
    assert perf["evaluate"]["images_per_s"] > 0
    assert perf["evaluate"]["images"] == json.loads((ws / "metrics/eval.json").read_text())["n_test"]


def test_a_second_evaluation_is_byte_identical(ws, monkeypatch):
    before = {p: (ws / p).read_bytes() for p in ("metrics/eval.json", "plots/confusion.csv")}
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(REPO / "stages"))  # as `python stages/evaluate.py` would
    runpy.run_path(str(REPO / "stages/evaluate.py"), run_name="__main__")  # in this process: faster
    assert {p: (ws / p).read_bytes() for p in before} == before


def test_confusion_csv_has_one_actual_predicted_row_per_test_image(ws):
    lines = (ws / "plots/confusion.csv").read_text().splitlines()
    assert lines[0] == "actual,predicted"
    test = pd.read_parquet(ws / "data/splits/test.parquet")
    table = pd.read_csv(ws / "plots/confusion.csv", dtype=str)
    assert len(table) == len(test)
    assert list(table["actual"]) == [str(v) for v in test["label"]]
    assert set(table["predicted"]) <= {str(d) for d in range(10)}
    accuracy = (table["actual"] == table["predicted"]).mean()
    assert round(accuracy, 6) == json.loads((ws / "metrics/eval.json").read_text())["accuracy"]


def test_prediction_grids_are_drawn(ws):
    for name in ("predictions.png", "misclassified.png"):
        with Image.open(ws / "reports" / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 60


def test_metrics_of_known_predictions():
    classes = [str(i) for i in range(10)]
    labels = np.array([0, 1, 2, 3])
    logits = np.full((4, 10), -5.0, np.float32)
    logits[0, 0] = logits[1, 1] = logits[2, 2] = 5.0  # three right
    logits[3, 4], logits[3, 3] = 5.0, 4.0  # wrong, but 3 is the second guess
    m = evaluate.metrics_of(logits, labels, classes, parameters=123, fingerprint="f" * 64)
    assert m["accuracy"] == 0.75 and m["top5_accuracy"] == 1.0
    assert m["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["0"]["f1"] == 1.0
    assert m["f1_weighted"] == 0.75
    assert m["parameters"] == 123 and m["n_test"] == 4
    few = evaluate.metrics_of(logits[:, :4], labels, classes[:4], 1, "f")
    assert "top5_accuracy" not in few


def test_a_model_trained_beside_another_test_split_is_refused(ws, tmp_path):
    state, meta = checkpoint.read_model_file(ws / "models/model.pt")
    meta["fingerprints"]["test"] = "0" * 64
    checkpoint.save_model(state, meta, tmp_path / "model.pt")
    _, meta = checkpoint.read_model_file(tmp_path / "model.pt")
    with pytest.raises(UserError, match="another test split"):
        evaluate.load_test(meta, Layout(ws))


def test_no_misclassified_image_gives_a_sheet_that_says_so(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    labels = np.array([0, 1, 2])
    evaluate.draw_misclassified(images, labels, labels, ["a", "b", "c"], 10, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        assert im.size == (420, 40)


def test_evaluate_and_predict_refuse_a_model_of_other_classes_with_one_message(ws):
    _, meta = checkpoint.read_model_file(ws / "models/model.pt")
    meta = meta | {"classes": list(reversed(meta["classes"]))}
    for load in (
        lambda: evaluate.load_test(meta, Layout(ws)),
        lambda: predict.load_rows(["test"], meta, Layout(ws)),
    ):
        with pytest.raises(
            UserError, match=r"model\.pt was trained on classes \['9', '8'.*splits\.json has \['0'"
        ):
            load()


def test_a_cluster_model_file_is_not_a_classifier(ws, tmp_path):
    state, meta = checkpoint.read_model_file(ws / "models/model.pt")
    checkpoint.save_model(state, meta, tmp_path / "dec.pt", checkpoint.DEC_FORMAT)
    with pytest.raises(UserError, match=r"not a photoprep model file of format 'photoprep\.model/1'"):
        checkpoint.load_model(tmp_path / "dec.pt")
    with pytest.raises(UserError, match=r"not found \(run the cluster stage first"):
        checkpoint.read_model_file(tmp_path / "none.pt", checkpoint.DEC_FORMAT)


@pytest.mark.parametrize("stage", ["evaluate", "predict"])
def test_training_code_is_outside_the_closure_of_evaluate_and_predict(stage):
    """A change to training code re-runs train (and so evaluate through the model file), never
    evaluate or predict by their code deps."""
    from imports import closure

    learn = REPO / "src/photoprep/learn"
    files = closure(REPO / "stages" / f"{stage}.py")
    assert learn / "train.py" not in files and learn / "live.py" not in files
    assert learn / "data.py" in files and learn / "checkpoint.py" in files
