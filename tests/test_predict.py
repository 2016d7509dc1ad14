"""The predict stage: the trained model on the unlabeled split (and test, to calibrate its confidence)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import PARAMS, run_stage, shared_pipeline
from test_train import one_thread  # noqa: F401 (an autouse fixture)

from photoprep.core import io
from photoprep.core.errors import UserError
from photoprep.core.layout import Layout
from photoprep.core.params import PredictParams
from photoprep.dataset.split import fingerprint
from photoprep.learn import checkpoint, predict

PREDICT = """\
predict:
  splits: [unlabeled, test]
  top_k: 3
  min_confidence: 0.9
  device: cpu
  per_class: 4
"""


def _with_unlabeled(root: Path) -> None:
    """Turn the val split into unlabeled images (labels dropped), as the real collection mostly is."""
    val = pd.read_parquet(root / "data/splits/val.parquet")
    unlabeled = val.assign(label=None, split="unlabeled")
    io.write_table(unlabeled, root / "data/splits/unlabeled.parquet")
    splits = json.loads((root / "reports/splits.json").read_text())
    splits["fingerprints"]["unlabeled"] = fingerprint(unlabeled)
    io.write_json(splits, root / "reports/splits.json")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict") / "ws"
    shutil.copytree(shared_pipeline(tmp_path_factory), root)
    _with_unlabeled(root)
    (root / "params.yaml").write_text(PARAMS + PREDICT)
    run_stage("predict", root)
    return root


def test_the_stage_writes_top3_for_unlabeled_and_test_images(ws: Path) -> None:
    table = pd.read_parquet(ws / "data/predictions.parquet")
    val = pd.read_parquet(ws / "data/splits/val.parquet")
    test = pd.read_parquet(ws / "data/splits/test.parquet")
    assert table["split"].value_counts().to_dict() == {"unlabeled": len(val), "test": len(test)}
    assert table["label"][table["split"] == "unlabeled"].isna().all()
    assert list(table["id"]) == list(val["id"]) + list(test["id"])
    probs = table[[f"probability_{k}" for k in (1, 2, 3)]].to_numpy()
    assert (probs[:, 0] >= probs[:, 1]).all() and (probs[:, 1] >= probs[:, 2]).all()
    assert (probs.sum(axis=1) <= 1 + 1e-5).all()
    classes = table[["class_1", "class_2", "class_3"]].to_numpy()
    assert all(len(set(row)) == 3 for row in classes)
    assert (table["prediction"] == table["class_1"]).all() and (
        table["probability"] == table["probability_1"]
    ).all()
    assert (ws / "reports/predicted.png").stat().st_size > 0


def test_the_test_rows_agree_with_the_evaluation(ws: Path) -> None:
    metrics = json.loads((ws / "metrics/predict.json").read_text())
    evaluation = json.loads((ws / "metrics/eval.json").read_text())
    assert metrics["splits"]["test"]["accuracy"] == evaluation["accuracy"]
    unlabeled = metrics["splits"]["unlabeled"]
    assert "accuracy" not in unlabeled and sum(unlabeled["predicted"].values()) == unlabeled["images"]
    table = pd.read_parquet(ws / "data/predictions.parquet")
    test = table[table["split"] == "test"]
    sure = test["probability"] >= 0.9
    assert metrics["splits"]["test"]["confident"] == int(sure.sum())
    if sure.any():
        assert metrics["splits"]["test"]["confident_accuracy"] == round(
            float((test["prediction"] == test["label"])[sure].mean()), 6
        )


def test_the_confidence_curve_trades_coverage_for_accuracy(ws: Path) -> None:
    curve = pd.read_csv(ws / "plots/confidence.csv")
    metrics = json.loads((ws / "metrics/predict.json").read_text())
    assert curve["threshold"].iloc[0] == 0.0 and curve["coverage"].iloc[0] == 1.0
    assert curve["accuracy"].iloc[0] == metrics["splits"]["test"]["accuracy"]
    assert (np.diff(curve["coverage"].to_numpy()) <= 0).all()
    assert (np.diff(curve["images"].to_numpy()) <= 0).all()


def test_a_second_run_is_byte_identical(ws: Path) -> None:
    outputs = (
        "data/predictions.parquet",
        "metrics/predict.json",
        "plots/confidence.csv",
        "reports/predicted.png",
    )
    before = {name: (ws / name).read_bytes() for name in outputs}
    run_stage("predict", ws)
    assert {name: (ws / name).read_bytes() for name in outputs} == before


def test_a_stale_split_table_is_refused(ws: Path, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    unlabeled = pd.read_parquet(root / "data/splits/unlabeled.parquet")
    io.write_table(unlabeled.iloc[1:], root / "data/splits/unlabeled.parquet")
    model, meta = checkpoint.load_model(root / "models/model.pt")
    with pytest.raises(UserError, match="fingerprint"):
        predict.predict_splits(model, meta, PredictParams(), Layout(root))


def test_top_k_ranks_ties_by_class_and_caps_k_at_the_class_count() -> None:
    logits = np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    index, prob = predict.top_k(logits, 3)
    assert index.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert np.allclose(prob.sum(axis=1), 1.0) and prob[0, 0] == prob[0, 1]
    rows = pd.DataFrame({"source": "s", "id": ["a", "b"], "row": [0, 1], "split": "unlabeled", "label": None})
    table = predict.prediction_table(rows, logits[:, :2], ["cat", "dog"], k=3)
    assert [c for c in table.columns if c.startswith("class_")] == ["class_1", "class_2"]
    assert table["prediction"].tolist() == ["dog", "cat"]


def test_no_image_to_label_gives_an_empty_table_and_empty_counts() -> None:
    rows = pd.DataFrame(columns=["source", "id", "row", "split", "label"])
    table = predict.prediction_table(rows, np.zeros((0, 2), np.float32), ["a", "b"], k=3)
    assert len(table) == 0 and "probability_2" in table.columns
    summary = predict.summarise(table, ["a", "b"], ["unlabeled"], 0.9)
    assert summary["splits"]["unlabeled"] == {
        "images": 0,
        "confident": 0,
        "coverage": None,
        "mean_probability": None,
        "predicted": {"a": 0, "b": 0},
    }
    assert predict.confidence_curve(table)["coverage"].isna().all()
