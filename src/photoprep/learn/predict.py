"""Label the rest: the trained model applied to the images that have no label.

:func:`predict_splits` runs the model of ``models/model.pt`` over the splits named in
``params.predict.splits`` (by default ``unlabeled`` and ``test``) and returns one row per image:

    source, id, row, split, label,             label: None for unlabeled images
    prediction, probability,                   the most probable class and its probability
    class_1, probability_1, ... class_k, probability_k     the top ``k`` (``predict.top_k``)

Probabilities are a float64 softmax of the model's float32 logits, rounded to 6 places; ties in
the ranking go to the earlier class. On the CPU the table is the same byte for byte in every run.

Why predict a labelled split too
    A confidence is only worth what it predicts. The rows of a labelled split (``test``: the
    model never saw it) say how often a prediction at or above a threshold is right, and for
    what share of the images: :func:`confidence_curve` gives coverage and accuracy per
    threshold (``plots/confidence.csv``), and ``metrics/predict.json`` reports them at
    ``predict.min_confidence``, which is how far ``photoprep review export --by prediction
    --min-confidence`` can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import PredictParams
from photoprep.dataset.split import clean_label
from photoprep.images import sheets
from photoprep.learn import devices, evaluate
from photoprep.learn.data import (
    Rows,
    check_classes,
    gather_rows,
    input_array_path,
    read_split_table,
    read_splits_report,
)

DECIMALS = 6
THRESHOLDS = np.round(np.arange(0, 100) / 100, 2)  # 0.00, 0.01, ... 0.99


@dataclass
class Predictions:
    table: pd.DataFrame  # one row per image, see the module notes
    metrics: dict[str, Any]  # metrics/predict.json
    curve: pd.DataFrame  # threshold, coverage, accuracy, images: on the labelled rows
    seconds: float


def load_rows(splits: list[str], meta: dict[str, Any], paths: Layout = PATHS) -> tuple[pd.DataFrame, Rows]:
    """The rows of ``splits`` (source, id, row, split, label) and their model inputs, in that order.

    Each split table must match its fingerprint in the splits report, and the model's
    classes those of the report: a stale table or model is a user error.
    """
    report = read_splits_report(paths.splits_report)
    check_classes(meta["classes"], report, paths)
    fingerprints = report.get("fingerprints") or {}
    frames = []
    for name in splits:
        table, _ = read_split_table(paths.split_table(name), fingerprints.get(name), paths)
        frames.append(table.assign(split=name)[["source", "id", "row", "split", "label"]])
    rows = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["source", "id", "row", "split", "label"])
    )
    rows["label"] = [clean_label(v) for v in rows["label"]]
    array_path = input_array_path(meta["input"], paths)
    inputs = gather_rows(meta["input"], rows["row"].to_numpy(dtype=np.int64), array_path, "the split tables")
    return rows, inputs


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class indices (N x k, most probable first, ties to the earlier class) and their softmax
    probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0:
        return np.zeros((len(z), k), np.int64), np.zeros((len(z), k))
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(axis=1, keepdims=True)
    order = np.argsort(-prob, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(prob, order, axis=1)


def prediction_table(rows: pd.DataFrame, logits: np.ndarray, classes: list[str], k: int) -> pd.DataFrame:
    """``rows`` with the top-``k`` classes and probabilities of each (``k`` capped at the class count)."""
    k = min(k, len(classes))
    index, prob = top_k(logits, k)
    names = np.asarray(classes, dtype=object)
    table = rows.reset_index(drop=True).copy()
    table["row"] = table["row"].astype("int64")
    table["prediction"] = names[index[:, 0]]
    table["probability"] = np.round(prob[:, 0], DECIMALS)
    for j in range(k):
        table[f"class_{j + 1}"] = names[index[:, j]]
        table[f"probability_{j + 1}"] = np.round(prob[:, j], DECIMALS)
    return table


def confidence_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Per threshold t: the share of labelled rows predicted with probability >= t, and their accuracy."""
    known = table[table["label"].notna()]
    right = (known["prediction"] == known["label"]).to_numpy()
    prob = known["probability"].to_numpy(dtype=np.float64)
    rows = []
    for t in THRESHOLDS:
        sure = prob >= t
        n = int(sure.sum())
        rows.append(
            {
                "threshold": float(t),
                "coverage": round(n / len(known), DECIMALS) if len(known) else None,
                "accuracy": round(float(right[sure].mean()), DECIMALS) if n else None,
                "images": n,
            }
        )
    return pd.DataFrame(rows, columns=["threshold", "coverage", "accuracy", "images"])


def summarise(
    table: pd.DataFrame, classes: list[str], splits: list[str], min_confidence: float
) -> dict[str, Any]:
    """metrics/predict.json: per split, images, how many are confident, the predicted classes, and on
    labelled splits the accuracy overall and among the confident ones."""
    out: dict[str, Any] = {"min_confidence": min_confidence, "splits": {}}
    for name in splits:
        part = table[table["split"] == name]
        sure = part["probability"] >= min_confidence
        entry: dict[str, Any] = {
            "images": len(part),
            "confident": int(sure.sum()),
            "coverage": round(float(sure.mean()), DECIMALS) if len(part) else None,
            "mean_probability": round(float(part["probability"].mean()), DECIMALS) if len(part) else None,
            "predicted": {
                c: int(v) for c, v in part["prediction"].value_counts().reindex(classes, fill_value=0).items()
            },
        }
        known = part[part["label"].notna()]
        if len(known):
            right = known["prediction"] == known["label"]
            entry["labelled"] = len(known)
            entry["accuracy"] = round(float(right.mean()), DECIMALS)
            confident = known["probability"] >= min_confidence
            entry["confident_accuracy"] = (
                round(float(right[confident].mean()), DECIMALS) if confident.any() else None
            )
        out["splits"][name] = entry
    return out


def predict_splits(
    model: nn.Module,
    meta: dict[str, Any],
    p: PredictParams,
    paths: Layout = PATHS,
) -> Predictions:
    """The model's top-k predictions over ``p.splits``, their summary and the confidence curve."""
    rows, inputs = load_rows(list(p.splits), meta, paths)
    device = devices.pick_device(p.device, "predict.device")
    if len(rows):
        logits, seconds = evaluate.logits_of(model, meta, inputs, p.batch_size, device)
    else:
        logits, seconds = np.zeros((0, len(meta["classes"])), np.float32), 0.0
    table = prediction_table(rows, logits, list(meta["classes"]), p.top_k)
    metrics = summarise(table, list(meta["classes"]), list(p.splits), p.min_confidence)
    return Predictions(table, metrics, confidence_curve(table), seconds)


def draw_by_class(
    table: pd.DataFrame, images: np.ndarray, classes: list[str], per_class: int, path: str | Path
) -> None:
    """A row per predicted class: its most confident images (unlabeled first when there are any),
    each captioned with its probability, and for labelled ones ``x`` when the prediction is wrong."""
    pool = table[table["split"] == "unlabeled"]
    pool = pool if len(pool) else table
    rows, titles = [], []
    for name in classes:
        mine = (
            pool[pool["prediction"] == name]
            .sort_values(["probability", "row"], ascending=[False, True], kind="mergesort")
            .head(per_class)
        )
        if not len(mine):
            continue
        cells = []
        for rec in mine.itertuples(index=False):
            wrong = rec.label is not None and rec.label != rec.prediction
            caption = f"{rec.probability:.2f}" + (" x" if wrong else "")
            cells.append((evaluate.thumb(np.asarray(images[int(rec.row)])), caption))
        rows.append(cells)
        titles.append(f"{name} ({int((pool['prediction'] == name).sum())})")
    sheets.contact_sheet(rows, titles, path, title_width=96)
