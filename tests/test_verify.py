"""`photoprep verify` passes on an untouched run and fails, with a diff, on any tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_evaluate import shared_pipeline
from test_train import one_thread  # noqa: F401 (an autouse fixture)

from photoprep.learn.verify import compare_metrics, verify


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return shared_pipeline(tmp_path_factory)


@pytest.fixture
def ws(pristine, tmp_path) -> Path:
    """A fresh copy of the committed run, safe to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "repo"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def test_an_untouched_run_verifies(ws, capsys):
    assert verify(root=ws) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "tolerance 0" in out


def test_retraining_on_the_cpu_reproduces_weights_and_metrics(ws, capsys):
    assert verify(retrain=True, root=ws) == 0
    assert "retrained on the CPU" in capsys.readouterr().out


def test_a_tampered_metric_fails_with_a_diff(ws, capsys):
    edit_json(ws / "metrics/eval.json", lambda m: m.update(accuracy=round(m["accuracy"] - 0.01, 6)))
    assert verify(root=ws) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "~ accuracy: committed" in out


def test_a_tiny_difference_fails_at_zero_tolerance_and_passes_within_one(ws, capsys):
    def nudge(metrics):
        metrics["per_class"]["3"]["recall"] += 1e-6

    edit_json(ws / "metrics/eval.json", nudge)
    assert verify(root=ws) == 1
    assert "per_class.3.recall" in capsys.readouterr().out
    assert verify(tolerance=1e-3, root=ws) == 0


def test_a_mismatched_split_fingerprint_fails(ws, capsys):
    edit_json(ws / "reports/splits.json", lambda r: r["fingerprints"].update(test="0" * 64))
    assert verify(root=ws) == 1
    out = capsys.readouterr().out
    assert "test split fingerprints differ" in out
    assert "reports/splits.json: 0000000000000000" in out


def test_a_changed_test_split_fails(ws, capsys):
    import pandas as pd

    test = pd.read_parquet(ws / "data/splits/test.parquet")
    test.iloc[1:].to_parquet(ws / "data/splits/test.parquet", index=False)
    assert verify(root=ws) == 1
    out = capsys.readouterr().out
    assert "test split fingerprints differ" in out and "~ n_test" in out


def test_changed_train_params_are_reported(ws, capsys):
    text = (ws / "params.yaml").read_text().replace("lr: 0.02", "lr: 0.03")
    (ws / "params.yaml").write_text(text)
    assert verify(root=ws) == 1
    assert "~ train.lr: model 0.02, params.yaml 0.03" in capsys.readouterr().out


def test_a_missing_model_cannot_be_verified(ws, capsys):
    (ws / "models/model.pt").unlink()
    assert verify(root=ws) == 2
    assert "models/model.pt not found" in capsys.readouterr().out


def test_compare_metrics_reports_missing_extra_and_changed_text():
    diff = compare_metrics({"a": 1.0, "b": "x", "c": {"d": 2}}, {"a": 1.0, "b": "y", "e": 3}, 0.0)
    assert diff == [
        "~ b: committed 'x', now 'y'",
        "- c.d: 2 (committed; not produced now)",
        "+ e: 3 (produced now; not committed)",
    ]


def _git(ws: Path, *args: str) -> None:
    import subprocess

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, *args], cwd=ws, check=True, capture_output=True)


def test_the_committed_figures_come_from_head_not_from_the_working_tree(ws, capsys):
    _git(ws, "init", "-q")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "results")
    assert verify(root=ws) == 0
    out = capsys.readouterr().out
    assert (
        "at HEAD" in out and "committed model trained on cpu" in out and "CPU math in force: portable" in out
    )
    # A local run that wrote other figures is compared with HEAD's, and fails.
    edit_json(ws / "metrics/eval.json", lambda m: m.update(accuracy=round(m["accuracy"] - 0.01, 6)))
    assert verify(root=ws) == 1
    assert "in the working tree is not the committed one" in capsys.readouterr().out


def test_an_uncommitted_experiment_is_checked_against_its_own_figures(ws, capsys):
    _git(ws, "init", "-q")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "results")
    edit_json(ws / "metrics/eval.json", lambda m: m.update(accuracy=round(m["accuracy"] - 0.01, 6)))
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("samples: 20", "samples: 21"))
    assert verify(root=ws) == 1  # the experiment's own (tampered) figures are checked
    out = capsys.readouterr().out
    assert "params.yaml differs from HEAD's in evaluate.samples: an experiment" in out
    assert "~ accuracy: committed" in out
