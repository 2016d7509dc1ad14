"""A network's pooled features of images (its *embeddings*): for the t-SNE map and for clustering.

An image's embedding is what the model's classifier reads: a timm model's pooled features (its
``forward_head(pre_logits=True)``), a small net's penultimate layer. A backbone without a
classifier (``num_classes`` 0, as the pretrained stage's weights are loaded for clustering)
gives them as its output. The GoogLeNet study behind this project mapped such CNN codes with
t-SNE; ``cluster.input: embeddings`` clusters them with DEC.

- :func:`forward`: embeddings and class probabilities of inputs, prepared as the model file says
  (the introspect stage's map);
- :func:`backbone`: the pretrained backbone as fetched (no classifier), with the metadata that
  says how to prepare its inputs (``cluster.embeddings: pretrained``);
- :func:`embed_images`: embeddings of every kept image, with their keys; :func:`embed_stage`
  reads them for the embed stage.

Batches of :data:`BATCH` images: the batch size is fixed because a convolution may pick another
algorithm for another batch size, and the embeddings would then differ in the last bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from photoprep.core.chunked import ChunkedArray
from photoprep.core.errors import UserError
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import TrainParams
from photoprep.learn import backbones, models
from photoprep.learn.data import Batches, Prep, Rows
from photoprep.learn.models import Architecture
from photoprep.learn.pretrained import Pretrained

__all__ = ["BATCH", "Embeddings", "backbone", "embed_images", "embed_stage", "forward"]

BATCH = 256


def forward(
    model: nn.Module, meta: dict[str, Any], inputs: np.ndarray | Rows, batch_size: int = BATCH
) -> tuple[np.ndarray, np.ndarray | None]:
    """The embeddings (float32 N x D) of ``inputs`` on the CPU, prepared as the model file's
    metadata says, and the class probabilities (float32 N x K; None without a classifier)."""
    model = model.to("cpu").eval()
    batches = Batches(inputs, np.zeros(len(inputs), dtype=np.int64), torch.device("cpu"), Prep.of(meta))
    k = int(meta["architecture"]["num_classes"])
    seen: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    hook = None
    if k:
        hook = models.classifier_of(model).register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().float().flatten(1))
        )
    try:
        with torch.no_grad():
            for x, _ in batches.in_order(batch_size):
                out = model(x).float()
                outputs.append(torch.softmax(out, dim=1) if k else out.flatten(1))
    finally:
        if hook is not None:
            hook.remove()
    if not outputs:
        return np.zeros((0, 0), np.float32), (np.zeros((0, k), np.float32) if k else None)
    if k:
        return torch.cat(seen).numpy(), torch.cat(outputs).numpy()
    return torch.cat(outputs).numpy(), None


def backbone(
    p: TrainParams, pretrained: Pretrained, stored_size: tuple[int, int]
) -> tuple[nn.Module, dict[str, Any]]:
    """The fetched backbone without a classifier, and metadata like a model file's: its inputs
    resized as ``train.image_size`` says (auto: the weights' own size) and normalised as the
    weights were trained (their mean and std, or each image by its own)."""
    cfg = pretrained.data_config
    if p.image_size == "auto":
        size = tuple(cfg["input_size"])
    else:
        size = tuple(p.image_size) if p.image_size else stored_size
    arch = Architecture.of(p.model, num_classes=0, input_size=size)
    model = backbones.create(arch, pretrained.state_dict).eval()
    meta = {
        "architecture": arch.to_dict(),
        "input_size": list(size),
        "normalization": {"kind": cfg.get("normalize", "pretrained"), "mean": cfg["mean"], "std": cfg["std"]},
        "interpolation": cfg.get("interpolation"),
    }
    return model, meta


@dataclass(frozen=True)
class Embeddings:
    """One row per kept image: its key (source, id, row of data/processed/images) and its embedding."""

    keys: pd.DataFrame
    vectors: np.ndarray  # float32 N x D
    info: dict[str, Any]  # data/embeddings/embeddings.json


def embed_images(
    model: nn.Module,
    meta: dict[str, Any],
    images: np.ndarray | ChunkedArray,
    keys: pd.DataFrame,
    origin: dict[str, Any],
) -> Embeddings:
    """The embeddings of every row of ``keys`` (``source``, ``id``, ``row``) of ``images``."""
    rows = Rows(images, keys["row"].to_numpy(dtype=np.int64))
    vectors, _ = forward(model, meta, rows)
    info = {
        **origin,
        "n_images": len(keys),
        "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        "architecture": meta["architecture"]["name"],
        "input_size": meta.get("input_size"),
    }
    return Embeddings(keys[["source", "id", "row"]].reset_index(drop=True), vectors.astype(np.float32), info)


def embed_stage(p: TrainParams, whose: str, paths: Layout = PATHS) -> Embeddings:
    """The embed stage's work: every kept image (``images.parquet``) through the trained model
    (``whose`` = ``model``) or the fetched backbone (``pretrained``)."""
    from photoprep.learn import checkpoint, pretrained

    keys = pd.read_parquet(paths.images_table, columns=["source", "id", "row"])
    images = ChunkedArray(paths.images_array)
    if whose == "model":
        model, meta = checkpoint.load_model(paths.model)
        origin = {"input": "embeddings", "embeddings": "model", "model": meta["architecture"]["name"]}
        origin["pretrained"] = (meta.get("pretrained") or {}).get("pretrained")
    else:
        start = pretrained.load_fetched(p, paths)
        if start is None:
            raise UserError(
                "cluster.embeddings: pretrained needs weights: set train.pretrained "
                "(and train.model: timm/<architecture>)"
            )
        model, meta = backbone(p, start, (int(images.shape[1]), int(images.shape[2])))
        origin = {
            "input": "embeddings",
            "embeddings": "pretrained",
            "model": p.model,
            "pretrained": p.pretrained,
        }
    return embed_images(model, meta, images, keys, origin)
