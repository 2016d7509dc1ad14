"""Evaluation of a trained model on the test split (only there: val picked the model).

:func:`evaluate` returns the metrics that go to ``metrics/eval.json`` (rounded to 6 decimals,
no wall-clock figure, so two runs compare byte for byte), one ``actual,predicted`` row per test
image for DVC's confusion template, and the timing that goes to ``metrics/perf.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from photoprep.core.chunked import ChunkedArray
from photoprep.core.errors import UserError
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import EvaluateParams
from photoprep.images import sheets
from photoprep.learn import devices
from photoprep.learn.data import Batches, Prep, Rows, SplitData, check_classes, load_split, read_splits_report

DECIMALS = 6
GRID_COLUMNS = 10
THUMB_MIN = 64  # smaller images are enlarged (nearest neighbour) in the grids


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # metrics/eval.json
    confusion: pd.DataFrame  # actual, predicted: class names, one row per test image
    predicted: np.ndarray  # class index per test image
    seconds: float
    device: str

    @property
    def images_per_s(self) -> float:
        return len(self.predicted) / self.seconds if self.seconds > 0 else math.nan


def load_test(meta: dict[str, Any], paths: Layout = PATHS, check_model: bool = True) -> SplitData:
    """The test split, as the model's input kind. Its fingerprint must match the splits report
    and (``check_model``) the split the model was trained beside, so no model is scored on
    images it may have trained on."""
    report = read_splits_report(paths.splits_report)
    classes = check_classes(meta["classes"], report, paths)
    test = load_split("test", meta["input"], classes, paths, (report.get("fingerprints") or {}).get("test"))
    expected = (meta.get("fingerprints") or {}).get("test")
    if check_model and expected and expected != test.fingerprint:
        raise UserError(
            f"{paths.model} was trained beside another test split ({expected[:12]} != "
            f"{test.fingerprint[:12]}): re-run the train stage"
        )
    return test


def logits_of(
    model: nn.Module, meta: dict[str, Any], inputs: np.ndarray | Rows, batch_size: int, device: torch.device
) -> tuple[np.ndarray, float]:
    """Logits (float32 N x K) of ``inputs`` in full precision, and the seconds it took."""
    model = model.to(device).eval()
    batches = Batches(inputs, np.zeros(len(inputs), dtype=np.int64), device, Prep.of(meta))
    out = []
    started = time.perf_counter()
    with torch.no_grad():
        for x, _ in batches.in_order(batch_size):
            out.append(model(x).float().cpu())
    seconds = time.perf_counter() - started
    logits = torch.cat(out).numpy() if out else np.zeros((0, meta["architecture"]["num_classes"]), np.float32)
    return logits, seconds


def _r(value: float) -> float:
    return round(float(value), DECIMALS)


def metrics_of(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    parameters: int,
    fingerprint: str,
    top_k: int = 5,
) -> dict[str, Any]:
    """eval.json: accuracy, top-k accuracy (with >= 2k classes), macro and weighted F1, loss,
    per-class precision, recall, F1 and support, test size, parameter count, fingerprint."""
    n, k = len(labels), len(classes)
    predicted = logits.argmax(1) if n else np.zeros(0, np.int64)
    t = torch.from_numpy(logits.astype(np.float32))
    losses = nn.functional.cross_entropy(t, torch.from_numpy(labels), reduction="none").numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(k)), zero_division=0
    )
    weights = support / support.sum() if support.sum() else np.zeros(k)
    metrics: dict[str, Any] = {"accuracy": _r((predicted == labels).mean()) if n else 0.0}
    if k >= 2 * top_k:
        top = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        metrics[f"top{top_k}_accuracy"] = _r((top == labels[:, None]).any(1).mean()) if n else 0.0
    metrics.update(
        {
            "f1_macro": _r(f1.mean()),
            "f1_weighted": _r((f1 * weights).sum()),
            "precision_macro": _r(precision.mean()),
            "recall_macro": _r(recall.mean()),
            "loss": _r(losses.astype(np.float64).mean()) if n else 0.0,
            "n_test": int(n),
            "n_classes": int(k),
            "parameters": int(parameters),
            "test_fingerprint": fingerprint,
            "per_class": {
                c: {
                    "precision": _r(precision[i]),
                    "recall": _r(recall[i]),
                    "f1": _r(f1[i]),
                    "support": int(support[i]),
                }
                for i, c in enumerate(classes)
            },
        }
    )
    return metrics


def evaluate(model: nn.Module, meta: dict[str, Any], test: SplitData, p: EvaluateParams) -> Evaluation:
    """Predict every test image and score the predictions."""
    device = devices.pick_device(p.device, "evaluate.device")
    logits, seconds = logits_of(model, meta, test.inputs, p.batch_size, device)
    classes = list(meta["classes"])
    parameters = sum(t.numel() for t in model.parameters())
    metrics = metrics_of(logits, test.labels, classes, parameters, test.fingerprint, p.top_k)
    predicted = logits.argmax(1) if len(logits) else np.zeros(0, np.int64)
    names = np.array(classes, dtype=object)
    confusion = pd.DataFrame({"actual": names[test.labels], "predicted": names[predicted]})
    return Evaluation(metrics, confusion, predicted, seconds, devices.device_name(device))


def perf_report(result: Evaluation, train_perf: dict[str, Any] | None, batch_size: int) -> dict[str, Any]:
    """metrics/perf.json: training time (from the train stage) and evaluation throughput."""
    return {
        "train": train_perf or {},
        "evaluate": {
            "device": result.device,
            "images": len(result.predicted),
            "batch_size": int(batch_size),
            "seconds": round(result.seconds, 3),
            "images_per_s": round(result.images_per_s, 1) if result.seconds > 0 else None,
        },
    }


# --------------------------------------------------------------------------- grids


def split_pixels(test: SplitData, paths: Layout = PATHS) -> Rows:
    """The test split's pixels (for the grids, read when drawn), whatever the model's input was."""
    if test.inputs.ndim == 4:
        return test.inputs
    images = ChunkedArray(paths.images_array)
    return Rows(images, test.table["row"].to_numpy(dtype=np.int64))


def thumb(pixels: np.ndarray) -> np.ndarray:
    factor = max(1, math.ceil(THUMB_MIN / min(pixels.shape[:2])))
    return np.repeat(np.repeat(pixels, factor, 0), factor, 1) if factor > 1 else pixels


def draw_predictions(
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    classes: list[str],
    count: int,
    path: str | Path,
) -> None:
    """A grid of ``count`` test images spread evenly over the split, captioned ``pred:true``."""
    n = len(labels)
    picks = (
        np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
        if n and count
        else np.zeros(0, int)
    )
    rows, titles = [], []
    for start in range(0, len(picks), GRID_COLUMNS):
        chunk = picks[start : start + GRID_COLUMNS]
        rows.append([(thumb(images[i]), f"{classes[predicted[i]]}:{classes[labels[i]]}") for i in chunk])
        titles.append(f"{int((predicted[chunk] == labels[chunk]).sum())}/{len(chunk)} right")
    sheets.contact_sheet(rows, titles, path, title_width=80)


def draw_misclassified(
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    classes: list[str],
    count: int,
    path: str | Path,
) -> None:
    """Up to ``count`` misclassified test images, a row per true class, captioned ``pred:true``."""
    wrong = np.flatnonzero(predicted != labels)[:count]
    rows, titles = [], []
    for k, name in enumerate(classes):
        mine = wrong[labels[wrong] == k]
        for start in range(0, len(mine), GRID_COLUMNS):
            chunk = mine[start : start + GRID_COLUMNS]
            rows.append([(thumb(images[i]), f"{classes[predicted[i]]}:{name}") for i in chunk])
            titles.append(f"true {name}")
    sheets.contact_sheet(rows, titles, path, title_width=80)
