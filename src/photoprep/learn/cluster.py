"""Clustering, as the cluster stage runs it: DEC beside k-means baselines, on hand-made features
or on a CNN's embeddings.

The steps (``p`` is ``params.cluster``):

1. **Input** (:class:`ClusterInput`). ``cluster.input: features``: the feature blocks named by
   ``p.blocks`` (``hog``, ``color``; their place in the vector comes from
   ``data/features/features.json``). ``cluster.input: embeddings``: the pooled features of a CNN
   (the embed stage's ``data/embeddings/``: the trained classifier's or the pretrained
   backbone's), as the GoogLeNet study clustered its CNN codes. Either way each column is
   centred when ``p.center``, then multiplied by one number ``s`` chosen as the paper does, so
   that the mean over images of ``(1/d) ||x||^2`` is 1. (The centring is ours: the 'original'
   HOG scaling leaves every column far from zero, and an autoencoder fed that learns little but
   the mean.)
2. **Baselines.** k-means (``p.kmeans_n_init`` restarts) on the scaled HOG + colour blocks
   (``kmeans_features``), and with embeddings also on the scaled embeddings (``kmeans_cnn``): the
   two feature kinds side by side in ``metrics/cluster.json``.
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

from photoprep import portable
from photoprep.core.chunked import ChunkedArray
from photoprep.core.errors import UserError
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import ClusterParams
from photoprep.dataset.split import clean_label, read_labels
from photoprep.learn.checkpoint import DEC_FORMAT, save_model
from photoprep.learn.dec import DEC, Log, fit_dec, hard_assign, run_kmeans
from photoprep.learn.devices import pick_device
from photoprep.learn.scores import agreement, purity

__all__ = [
    "BLOCKS",
    "METHODS",
    "TABLE_COLUMNS",
    "ClusterInput",
    "ClusterResult",
    "assign",
    "cluster_features",
    "embeddings_input",
    "features_input",
    "history_tables",
    "input_scaling",
    "labels_for",
    "read_input",
    "save_dec",
    "scale_inputs",
    "select_blocks",
]

BLOCKS = ("hog", "color")
METHODS = ("kmeans_features", "kmeans_cnn", "kmeans_embedding", "dec")  # kmeans_cnn: embeddings only
TABLE_COLUMNS = ["source", "id", "row", "cluster", "confidence", "distance"]


def _stderr(line: str) -> None:
    print(f"cluster: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- input


def select_blocks(
    features: np.ndarray | ChunkedArray, info: dict[str, Any], blocks: Sequence[str]
) -> np.ndarray:
    """The columns of the named blocks (``hog``, ``color``), in that order, as float32."""
    features = np.asarray(features)  # a chunked array: read whole, once
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


@dataclass(frozen=True)
class ClusterInput:
    """What is clustered: one vector per image (``keys``: source, id, row), what metrics say of it,
    and with embeddings the HOG + colour blocks of the same images for the side-by-side k-means."""

    kind: str  # features | embeddings
    vectors: np.ndarray  # float32 N x D
    keys: pd.DataFrame
    describe: dict[str, Any]
    source_dim: int  # columns of the array the vectors came from (data/features/features: all blocks)
    features: np.ndarray | None = None  # embeddings only: the same rows' HOG + colour blocks


def features_input(
    features: np.ndarray | ChunkedArray, info: dict[str, Any], keys: pd.DataFrame, p: ClusterParams
) -> ClusterInput:
    """The HOG + colour blocks of ``p.blocks`` of every row of ``features``."""
    vectors = select_blocks(features, info, p.blocks)
    return ClusterInput("features", vectors, keys, {"blocks": list(p.blocks)}, int(features.shape[1]))


def embeddings_input(
    vectors: np.ndarray,
    info: dict[str, Any],
    keys: pd.DataFrame,
    features: np.ndarray | ChunkedArray,
    features_info: dict[str, Any],
    feature_keys: pd.DataFrame,
    p: ClusterParams,
) -> ClusterInput:
    """The embeddings of the embed stage, with the HOG + colour blocks of the same images."""
    if info.get("input") != "embeddings" or len(vectors) != len(keys):
        raise UserError("cluster.input: embeddings, but data/embeddings holds none: run the embed stage")
    at = pd.Series(
        np.arange(len(feature_keys)), index=pd.MultiIndex.from_frame(feature_keys[["source", "id"]])
    )
    found = at.reindex(pd.MultiIndex.from_frame(keys[["source", "id"]]))
    if found.isna().any():
        raise UserError(
            "data/embeddings and data/features hold other images: run the features and embed stages"
        )
    blocks = select_blocks(np.asarray(features)[found.to_numpy(dtype=np.int64)], features_info, p.blocks)
    describe = {k: info.get(k) for k in ("embeddings", "model", "pretrained", "architecture", "input_size")}
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return ClusterInput("embeddings", vectors, keys, describe, int(vectors.shape[1]), blocks)


def _method_scores(
    labels: np.ndarray, assignments: dict[str, np.ndarray]
) -> dict[str, dict[str, float] | None]:
    known = np.array([lab is not None for lab in labels], dtype=bool)
    if not known.any():
        return dict.fromkeys(assignments)
    truth = np.array([str(v) for v in labels[known]], dtype=object)
    return {name: agreement(truth, a[known]) for name, a in assignments.items()}


def _labels(labels: Sequence[Any] | None, n: int) -> np.ndarray:
    out = np.array([clean_label(lab) for lab in (labels if labels is not None else [None] * n)], dtype=object)
    if len(out) != n:
        raise UserError(f"cluster: {n} rows to cluster but {len(out)} labels")
    return out


def _baselines(
    inp: ClusterInput, x: np.ndarray, p: ClusterParams, perf: dict[str, Any], log: Log
) -> dict[str, np.ndarray]:
    """k-means on the HOG + colour blocks, and on the embeddings when those are the input."""
    out = {}
    runs = [("kmeans_features", x if inp.features is None else scale_inputs(inp.features, p.center)[0])]
    if inp.features is not None:
        runs.append(("kmeans_cnn", x))
    for name, vectors in runs:
        t0 = time.perf_counter()
        out[name] = run_kmeans(vectors, p.n_clusters, p.kmeans_n_init, p.seed).labels_
        perf[f"{name}_s"] = time.perf_counter() - t0
        log(f"{name}: k-means on {vectors.shape[1]} columns: {perf[f'{name}_s']:.1f} s")
    return out


def _metrics(
    inp: ClusterInput,
    x_dim: int,
    scale: float,
    fit: Any,
    scores: dict[str, Any],
    labels: np.ndarray,
    p: ClusterParams,
) -> dict[str, Any]:
    summary = purity(labels, fit.clusters)
    refinement, pre_history = fit.refinement, fit.pretrain_history
    return {
        "n_images": len(inp.keys),
        "n_labeled": int(sum(lab is not None for lab in labels)),
        "n_classes": len({lab for lab in labels if lab is not None}),
        "n_clusters": p.n_clusters,
        "input": {
            "kind": inp.kind,
            **inp.describe,
            "dim": int(x_dim),
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


def cluster_features(
    inp: ClusterInput,
    labels: Sequence[Any] | None,
    p: ClusterParams,
    log: Log | None = _stderr,
) -> ClusterResult:
    """Cluster every row of ``inp`` with DEC and score it beside the k-means baselines.

    ``labels`` (one per row, None or NaN for unlabelled) is used for the metrics and nothing else.
    """
    log = log or (lambda line: None)
    t_start = time.perf_counter()
    n = len(inp.vectors)
    if len(inp.keys) != n:
        raise UserError(f"cluster: {n} rows to cluster but {len(inp.keys)} keys")
    if n < p.n_clusters:  # before the scaling, which has nothing to average over an empty set
        raise UserError(f"cluster.n_clusters: {p.n_clusters} clusters but only {n} images")
    label_array = _labels(labels, n)
    x_np, mean, scale = scale_inputs(inp.vectors, p.center)
    pick_device(p.device, "cluster.device")  # a missing GPU stops the run before k-means takes its time
    perf: dict[str, Any] = {"device": None, "n_images": n, "input_dim": int(x_np.shape[1])}
    assignments = _baselines(inp, x_np, p, perf, log)
    fit = fit_dec(x_np, mean, scale, p, log)
    perf.update(fit.perf)
    assignments |= {"kmeans_embedding": fit.start, "dec": fit.clusters}
    keys = inp.keys
    table = pd.DataFrame(
        {
            "source": keys["source"].astype(str).to_numpy(dtype=object),
            "id": keys["id"].astype(str).to_numpy(dtype=object),
            "row": keys["row"].astype("int64").to_numpy() if "row" in keys else np.arange(n, dtype=np.int64),
            "cluster": fit.clusters,
            "confidence": np.round(fit.confidence, 6),
            "distance": np.round(fit.distance, 6),
        },
        columns=TABLE_COLUMNS,
    )
    scores = _method_scores(label_array, assignments)
    metrics = _metrics(inp, x_np.shape[1], scale, fit, scores, label_array, p)
    scored = {name: s for name, s in scores.items() if s is not None}
    if scored:
        log(
            f"accuracy / NMI / ARI on {metrics['n_labeled']} labelled images: "
            + "; ".join(
                f"{k} {s['accuracy']:.3f} / {s['nmi']:.3f} / {s['ari']:.3f}" for k, s in scored.items()
            )
        )
    meta = {
        "format": DEC_FORMAT,
        "input": inp.kind,
        "input_dim": int(x_np.shape[1]),
        "blocks": list(p.blocks),
        "feature_dim": inp.source_dim,
        "dims": list(p.dims),
        "n_clusters": p.n_clusters,
        "alpha": p.alpha,
        "params": p.model_dump(mode="json"),
        "iterations": fit.refinement.iterations,
        "converged": fit.refinement.converged,
    }
    perf |= {"total_s": time.perf_counter() - t_start, "threads": p.threads or torch.get_num_threads()}
    perf["cpu"] = portable.describe()
    pre = pd.DataFrame(fit.pretrain_history, columns=["phase", "epoch", "loss"])
    ref = pd.DataFrame(fit.refinement.history, columns=["iteration", "kl", "changed"])
    return ClusterResult(table, fit.state_dict, meta, metrics, pre, ref, perf)


# --------------------------------------------------------------------------- files


def read_input(p: ClusterParams, paths: Layout = PATHS) -> ClusterInput:
    """What the cluster stage clusters (``cluster.input``), read from the features stage's files
    and, for embeddings, the embed stage's."""
    from photoprep.core.io import read_json

    features = ChunkedArray(paths.features_array)
    info = read_json(paths.features_info)
    keys = pd.read_parquet(paths.features_table, columns=["source", "id", "row"])
    if p.input == "features":
        return features_input(features, info, keys, p)
    embedded = read_json(paths.embeddings_info)
    if embedded.get("input") != "embeddings":
        raise UserError(
            f"cluster.input: embeddings, but {PATHS.embeddings_dir} holds none: run the embed stage"
        )
    vectors = np.load(paths.embeddings_array)
    embedded_keys = pd.read_parquet(paths.embeddings_table)
    return embeddings_input(vectors, embedded, embedded_keys, features, info, keys, p)


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
