"""Clustering of the feature vectors, as the cluster stage runs it: DEC beside two k-means baselines.

The steps (``p`` is ``params.cluster``):

1. **Input.** The feature blocks named by ``p.blocks`` (``hog``, ``color``; their place in the
   vector comes from ``data/features/features.json``), each column centred when ``p.center``,
   then multiplied by one number ``s`` chosen as the paper does, so that the mean over images
   of ``(1/d) ||x||^2`` is 1. (The centring is ours: the 'original' HOG scaling leaves every
   column far from zero, and an autoencoder fed that learns little but the mean.)
2. **Baseline.** k-means (``p.kmeans_n_init`` restarts) on those scaled input features.
3. **DEC.** Pretraining, k-means in the embedding (DEC's start, the second baseline) and the
   refinement: :func:`photoprep.learn.dec.fit_dec`, whose notes give the method and its
   determinism.
4. **Scores.** Against the labels where images have one (they are used for nothing else):
   unsupervised accuracy (best one-to-one mapping), NMI and ARI for each method, and per
   cluster its size, majority label and purity.

There is no fallback to the start: the metrics file reports the start (k-means on the
embedding) beside DEC, and k-means on the same input features, so a regression shows.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from photoprep import portable
from photoprep.core.errors import UserError
from photoprep.core.params import ClusterParams
from photoprep.dataset.split import clean_label, read_labels
from photoprep.learn.checkpoint import DEC_FORMAT, save_model
from photoprep.learn.dec import DEC, Log, fit_dec, hard_assign, run_kmeans
from photoprep.learn.devices import pick_device

__all__ = [
    "BLOCKS",
    "METHODS",
    "TABLE_COLUMNS",
    "ClusterResult",
    "agreement",
    "assign",
    "cluster_features",
    "history_tables",
    "input_scaling",
    "labels_for",
    "purity",
    "save_dec",
    "scale_inputs",
    "select_blocks",
    "unsupervised_accuracy",
]

BLOCKS = ("hog", "color")
METHODS = ("kmeans_features", "kmeans_embedding", "dec")
TABLE_COLUMNS = ["source", "id", "row", "cluster", "confidence", "distance"]


def _stderr(line: str) -> None:
    print(f"cluster: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- input


def select_blocks(features: np.ndarray, info: dict[str, Any], blocks: Sequence[str]) -> np.ndarray:
    """The columns of the named blocks (``hog``, ``color``), in that order, as float32."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise UserError(f"cluster: features must be a N x D matrix (got shape {features.shape})")
    if list(blocks) == list(BLOCKS) and info.get("dim", features.shape[1]) == features.shape[1]:
        return np.ascontiguousarray(features, dtype=np.float32)
    parts = []
    for name in blocks:
        block = info.get(name)
        if not isinstance(block, dict) or "offset" not in block or "length" not in block:
            raise UserError(
                f"cluster.blocks: the features carry no block {name!r} (features.json has {sorted(info)})"
            )
        start, length = int(block["offset"]), int(block["length"])
        if start < 0 or start + length > features.shape[1]:
            raise UserError(
                f"cluster.blocks: block {name!r} lies outside the {features.shape[1]} feature columns"
            )
        parts.append(features[:, start : start + length])
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def input_scaling(x: np.ndarray, center: bool = True) -> tuple[np.ndarray, float]:
    """Column means (zeros when not centring) and the factor ``s`` with mean (1/d)||(x - m) s||^2 = 1."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64) if center else np.zeros(x.shape[1])
    centred = x - mean.astype(np.float32)
    mean_sq = float(np.mean(np.einsum("ij,ij->i", centred, centred, dtype=np.float64))) / max(x.shape[1], 1)
    scale = 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0
    return mean.astype(np.float32), scale


def scale_inputs(x: np.ndarray, center: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """``(x - mean) * s`` as the paper scales its input ((1/d)||x||^2 ≈ 1), with the mean and ``s``."""
    mean, scale = input_scaling(x, center)
    return ((np.asarray(x, dtype=np.float32) - mean) * np.float32(scale)).astype(np.float32), mean, scale


# --------------------------------------------------------------------------- metrics


def unsupervised_accuracy(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> float:
    """Share of images whose cluster maps to their class under the best one-to-one mapping.

    The mapping maximises the matches (Hungarian method, scipy's ``linear_sum_assignment``);
    with more clusters than classes the extra clusters count as wrong, and vice versa.
    """
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} labels but {len(pred)} assignments")
    if not len(truth):
        return float("nan")
    classes, t = np.unique(truth, return_inverse=True)
    clusters, c = np.unique(pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (c, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(truth))


def agreement(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """Unsupervised accuracy, NMI and ARI of assignments against labels, rounded to 6 places."""
    return {
        "accuracy": round(unsupervised_accuracy(y_true, y_pred), 6),
        "nmi": round(float(normalized_mutual_info_score(y_true, y_pred)), 6),
        "ari": round(float(adjusted_rand_score(y_true, y_pred)), 6),
    }


def purity(labels: Sequence[Any] | np.ndarray, clusters: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """Per cluster: size, labelled members, majority label and its share among them."""
    frame = pd.DataFrame({"cluster": np.asarray(clusters, dtype=np.int64), "label": list(labels)})
    rows = []
    for c, members in frame.groupby("cluster", sort=True):
        known = members["label"].dropna()
        counts = known.value_counts(sort=False)
        if len(counts):
            best = int(counts.max())
            majority = sorted(str(k) for k, v in counts.items() if v == best)[0]
            share = round(best / len(known), 6)
        else:
            majority, share = None, None
        rows.append(
            {
                "cluster": int(c),
                "size": len(members),
                "labeled": len(known),
                "majority": majority,
                "purity": share,
            }
        )
    return pd.DataFrame(rows, columns=["cluster", "size", "labeled", "majority", "purity"])


# --------------------------------------------------------------------------- the stage's run


@dataclass
class ClusterResult:
    """Per image assignments, the trained model, the metrics and the progress of each phase."""

    table: pd.DataFrame  # source, id, row, cluster, confidence, distance
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    metrics: dict[str, Any]
    pretrain_history: pd.DataFrame  # phase, epoch, loss
    refine_history: pd.DataFrame  # iteration, kl, changed
    perf: dict[str, Any] = field(default_factory=dict)


def _method_scores(
    labels: np.ndarray, assignments: dict[str, np.ndarray]
) -> dict[str, dict[str, float] | None]:
    known = np.array([lab is not None for lab in labels], dtype=bool)
    if not known.any():
        return dict.fromkeys(assignments)
    truth = np.array([str(v) for v in labels[known]], dtype=object)
    return {name: agreement(truth, a[known]) for name, a in assignments.items()}


def cluster_features(
    features: np.ndarray,
    info: dict[str, Any],
    keys: pd.DataFrame,
    labels: Sequence[Any] | None,
    p: ClusterParams,
    log: Log | None = _stderr,
) -> ClusterResult:
    """Cluster every row of ``features`` with DEC and score it, with both k-means baselines.

    ``keys`` (``source``, ``id``, ``row``) names the rows; ``labels`` (one per row, None or NaN
    for unlabelled) is used for the metrics and nothing else.
    """
    log = log or (lambda line: None)
    t_start = time.perf_counter()
    n = len(features)
    if len(keys) != n:
        raise UserError(f"cluster: {n} feature rows but {len(keys)} keys")
    if n < p.n_clusters:  # before the scaling, which has nothing to average over an empty set
        raise UserError(f"cluster.n_clusters: {p.n_clusters} clusters but only {n} images")
    label_array = np.array(
        [clean_label(lab) for lab in (labels if labels is not None else [None] * n)],
        dtype=object,
    )
    if len(label_array) != n:
        raise UserError(f"cluster: {n} feature rows but {len(label_array)} labels")

    x_np, mean, scale = scale_inputs(select_blocks(features, info, p.blocks), p.center)
    pick_device(p.device, "cluster.device")  # a missing GPU stops the run before k-means takes its time
    perf: dict[str, Any] = {"device": None, "n_images": n, "input_dim": int(x_np.shape[1])}

    t0 = time.perf_counter()
    km_features = run_kmeans(x_np, p.n_clusters, p.kmeans_n_init, p.seed)
    perf["kmeans_features_s"] = time.perf_counter() - t0
    log(f"k-means on {x_np.shape[1]} feature columns: {perf['kmeans_features_s']:.1f} s")

    fit = fit_dec(x_np, mean, scale, p, log)
    perf.update(fit.perf)
    clusters, refinement, pre_history = fit.clusters, fit.refinement, fit.pretrain_history

    table = pd.DataFrame(
        {
            "source": keys["source"].astype(str).to_numpy(dtype=object),
            "id": keys["id"].astype(str).to_numpy(dtype=object),
            "row": keys["row"].astype("int64").to_numpy() if "row" in keys else np.arange(n, dtype=np.int64),
            "cluster": clusters,
            "confidence": np.round(fit.confidence, 6),
            "distance": np.round(fit.distance, 6),
        },
        columns=TABLE_COLUMNS,
    )

    assignments = {"kmeans_features": km_features.labels_, "kmeans_embedding": fit.start, "dec": clusters}
    scores = _method_scores(label_array, assignments)
    summary = purity(label_array, clusters)
    n_labeled = int(sum(lab is not None for lab in label_array))
    metrics = {
        "n_images": n,
        "n_labeled": n_labeled,
        "n_classes": len({lab for lab in label_array if lab is not None}),
        "n_clusters": p.n_clusters,
        "input": {
            "blocks": list(p.blocks),
            "dim": int(x_np.shape[1]),
            "center": p.center,
            "scale": round(float(scale), 6),
        },
        "kmeans": {"n_init": p.kmeans_n_init, "random_state": p.seed, "algorithm": "lloyd"},
        "methods": scores,
        "dec": {
            "iterations": refinement.iterations,
            "target_updates": refinement.updates,
            "converged": refinement.converged,
            "changed_at_last_update": round(refinement.changed, 6),
            "pretrain_epochs": p.pretrain_epochs,
            "pretrain": p.pretrain,
            "final_pretrain_loss": round(pre_history[-1]["loss"], 6) if pre_history else None,
        },
        "cluster_sizes": {
            str(int(c)): int(s) for c, s in zip(summary["cluster"], summary["size"], strict=True)
        },
        "purity": {
            str(int(c)): (None if pd.isna(v) else float(v))
            for c, v in zip(summary["cluster"], summary["purity"], strict=True)
        },
    }
    scored = {name: s for name, s in scores.items() if s is not None}
    if scored:
        log(
            f"accuracy / NMI / ARI on {n_labeled} labelled images: "
            + "; ".join(
                f"{name} {s['accuracy']:.3f} / {s['nmi']:.3f} / {s['ari']:.3f}" for name, s in scored.items()
            )
        )
    meta = {
        "format": DEC_FORMAT,
        "input_dim": int(x_np.shape[1]),
        "blocks": list(p.blocks),
        "feature_dim": int(np.asarray(features).shape[1]),
        "dims": list(p.dims),
        "n_clusters": p.n_clusters,
        "alpha": p.alpha,
        "params": p.model_dump(mode="json"),
        "iterations": refinement.iterations,
        "converged": refinement.converged,
    }
    perf["total_s"] = time.perf_counter() - t_start
    perf["threads"] = p.threads or torch.get_num_threads()
    perf["cpu"] = portable.describe()
    pre = pd.DataFrame(pre_history, columns=["phase", "epoch", "loss"])
    ref = pd.DataFrame(refinement.history, columns=["iteration", "kl", "changed"])
    return ClusterResult(
        table=table,
        state_dict=fit.state_dict,
        meta=meta,
        metrics=metrics,
        pretrain_history=pre,
        refine_history=ref,
        perf=perf,
    )


# --------------------------------------------------------------------------- files


def labels_for(keys: pd.DataFrame, splits_dir: str | Path) -> list[str | None]:
    """Each key's label in the split tables (train, val, test, unlabeled), None when it has none."""
    known = read_labels(splits_dir).set_index(["source", "id"])["label"]
    found = known.reindex(pd.MultiIndex.from_frame(keys[["source", "id"]].astype(str)))
    return [clean_label(v) for v in found.to_numpy()]


def save_dec(result: ClusterResult, path: str | Path) -> None:
    """The DEC model of ``result`` as a ``photoprep.dec/1`` model file, atomically (read it back
    with :func:`photoprep.learn.dec.load_dec`)."""
    save_model(result.state_dict, result.meta, path, DEC_FORMAT)


@torch.no_grad()
def assign(model: DEC, meta: dict[str, Any], features: np.ndarray, info: dict[str, Any]) -> pd.DataFrame:
    """Cluster, confidence and distance to its centre of new feature rows, with a trained model."""
    x = select_blocks(features, info, meta["blocks"])
    xt = (torch.from_numpy(x).to(model.centres.device) - model.input_mean) * model.input_scale
    hard, confidence, distance = hard_assign(model, xt)
    return pd.DataFrame(
        {"cluster": hard.cpu().numpy().astype(np.int64), "confidence": confidence, "distance": distance}
    )


def history_tables(result: ClusterResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pretraining loss per epoch and the refinement per target update, rounded for CSV plots."""
    pre = result.pretrain_history.assign(loss=result.pretrain_history["loss"].round(6))
    ref = result.refine_history.copy()
    ref["kl"] = ref["kl"].astype(float).round(6)
    ref["changed"] = ref["changed"].round(6)
    return pre, ref
