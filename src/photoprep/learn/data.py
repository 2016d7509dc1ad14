"""The learn room's data: split tables and their arrays, as the models want them, cut into batches.

A split is read from its table (``data/splits/<name>.parquet``, whose fingerprint must equal the
one in ``reports/splits.json``) and the rows it names are gathered once from the memory-mapped
``images.npy`` (uint8 N x H x W x 3) or ``features.npy`` (float32 N x D): :class:`SplitData`.
Train, evaluate, predict and verify all read splits through here, with the paths of a
:class:`~photoprep.layout.Layout`.

The hot path has no per-sample Python: a split's pixels are one uint8 tensor; :class:`Batches`
cuts each batch from it with an index tensor, moves it to the device, then shifts / mirrors and
normalises it there. On CUDA the uint8 split lives on the GPU when it fits in a quarter of the
free memory; otherwise batches are gathered into pinned buffers and copied asynchronously while
the GPU works on the previous one. Augmentation draws come from a CPU generator, so they are the
same on every device.

Why one module
    A split's rows, its batches and its augmentation share one definition of the order and the
    draws (one seeded generator per epoch, which DDP ranks also slice); split apart, a change to
    one would silently change what the others mean, and a model's bytes with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from photoprep.core.errors import UserError
from photoprep.core.io import read_json
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import TrainParams
from photoprep.dataset.split import fingerprint as split_fingerprint

__all__ = [
    "Batches",
    "SplitData",
    "TrainData",
    "augment_images",
    "check_classes",
    "draw_augmentation",
    "gather_rows",
    "input_array_path",
    "input_kind",
    "input_stats",
    "load_data",
    "load_split",
    "read_split_table",
    "read_splits_report",
    "standardise_per_image",
]


# --------------------------------------------------------------------------- splits


@dataclass
class SplitData:
    """One split: its table, its inputs (uint8 N x H x W x 3 images or float32 N x D features),
    its labels as class indices, and its fingerprint."""

    name: str
    table: pd.DataFrame
    inputs: np.ndarray
    labels: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TrainData:
    train: SplitData
    val: SplitData
    classes: list[str]
    kind: str  # "images" | "features"
    fingerprints: dict[str, str] = field(default_factory=dict)


def input_kind(model: str, chosen: str | None = None) -> str:
    """``images`` or ``features``: ``chosen`` (``train.input``) when set, else the model's own."""
    if chosen is not None:
        return chosen
    return "features" if model == "mlp" else "images"


def read_splits_report(path: str | Path) -> dict[str, Any]:
    """``reports/splits.json``: the classes (in class-index order) and each split's fingerprint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (run the split stage first: dvc repro split)")
    report: dict[str, Any] = read_json(path)
    return report


def check_classes(model_classes: Sequence[str], report: dict[str, Any], paths: Layout = PATHS) -> list[str]:
    """The classes of the splits report, which must be the model's, in the same order: a model
    scored or applied against other classes would name every prediction wrongly."""
    classes = [str(c) for c in report["classes"]]
    if classes != [str(c) for c in model_classes]:
        raise UserError(
            f"{paths.model} was trained on classes {list(model_classes)[:5]}..., {paths.splits_report} "
            f"has {classes[:5]}...: re-run the train stage"
        )
    return classes


def input_array_path(kind: str, paths: Layout = PATHS) -> Path:
    """The array a model of input ``kind`` (``images`` or ``features``) reads its rows from."""
    return paths.features_array if kind == "features" else paths.images_array


def load_split(
    name: str,
    kind: str,
    classes: list[str],
    paths: Layout = PATHS,
    expected_fingerprint: str | None = None,
) -> SplitData:
    """Read the split table ``name`` and gather its rows of images.npy (or features.npy).

    The split's fingerprint is recomputed and must equal ``expected_fingerprint`` when given
    (the one in reports/splits.json): a stale split table is a user error, not a silent mix-up.
    """
    table_path = paths.split_table(name)
    array_path = input_array_path(kind, paths)
    if not array_path.exists():
        raise UserError(f"{array_path} not found (run the earlier stages first: dvc repro)")
    table, fp = read_split_table(table_path, expected_fingerprint, paths)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(table["label"].astype(str)) - set(index))
    if unknown:
        raise UserError(f"{table_path}: label {unknown[0]!r} is not a class of {paths.splits_report}")
    labels = np.array([index[str(v)] for v in table["label"]], dtype=np.int64)
    inputs = gather_rows(kind, table["row"].to_numpy(dtype=np.int64), array_path, table_path)
    return SplitData(name, table, inputs, labels, fp)


def read_split_table(
    table_path: Path, expected_fingerprint: str | None = None, paths: Layout = PATHS
) -> tuple[pd.DataFrame, str]:
    """A split table and its fingerprint, which must equal ``expected_fingerprint`` when given."""
    if not table_path.exists():
        raise UserError(f"{table_path} not found (run the earlier stages first: dvc repro)")
    table = pd.read_parquet(table_path)
    fp = split_fingerprint(table)
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise UserError(
            f"{table_path} does not match its fingerprint in {paths.splits_report} "
            f"({fp[:12]} != {expected_fingerprint[:12]}): re-run the split stage"
        )
    return table, fp


def gather_rows(kind: str, rows: np.ndarray, array_path: Path, table_path: Path | str) -> np.ndarray:
    """Rows ``rows`` of images.npy (uint8 N x H x W x 3) or features.npy (float32 N x D), in that order."""
    array = np.load(array_path, mmap_mode="r")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(array)):
        raise UserError(f"{table_path}: row {int(rows.max())} is outside {array_path} ({len(array)} rows)")
    # One gather in sorted order reads the memory map sequentially; then back to table order.
    order = np.argsort(rows, kind="stable")
    inputs = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    inputs[order] = array[rows[order]]
    if kind == "images" and (inputs.ndim != 4 or inputs.shape[-1] != 3 or inputs.dtype != np.uint8):
        raise UserError(f"{array_path}: expected uint8 N x H x W x 3 (got {inputs.dtype} {inputs.shape})")
    if kind == "features":
        inputs = inputs.astype(np.float32, copy=False)
    return inputs


def load_data(p: TrainParams, paths: Layout = PATHS) -> TrainData:
    """The train and val splits of the pipeline, as the model in ``p`` wants them."""
    report = read_splits_report(paths.splits_report)
    classes = [str(c) for c in report["classes"]]
    fps = dict(report.get("fingerprints", {}))
    kind = input_kind(p.model, p.input)
    train = load_split("train", kind, classes, paths, fps.get("train"))
    val = load_split("val", kind, classes, paths, fps.get("val"))
    if len(train) == 0:
        raise UserError(f"{paths.split_table('train')} is empty: nothing to train on")
    return TrainData(train, val, classes, kind, fps)


def input_stats(inputs: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Mean and std per channel (images, in [0, 1] units) or per column (features), in float64."""
    axes = (0, 1, 2) if inputs.ndim == 4 else (0,)
    width = inputs.shape[-1]
    total = np.zeros(width)
    squares = np.zeros(width)
    count = 0
    for start in range(0, len(inputs), chunk):
        part = np.asarray(inputs[start : start + chunk], dtype=np.float64)
        if inputs.ndim == 4:
            part = part / 255.0
        total += part.sum(axis=axes)
        squares += (part**2).sum(axis=axes)
        count += part.size // width
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return [round(float(m), 8) for m in mean], [round(float(s), 8) for s in std]


# --------------------------------------------------------------------------- batches


class Batches:
    """A split's inputs as one tensor, cut into batches by index and prepared on the device.

    Images stay uint8 until they are on the device; augmentation runs there on uint8, then they
    become float (NCHW, channels_last strides when asked), are resized to ``size`` when one is
    given (area averaging when smaller) and normalised: by the split's mean and std (one
    multiply-add), or ``per_image``, each image and channel by its own.

    ``resident``: keep the whole split on the CUDA device (None: when it fits in a quarter of
    the free memory; otherwise each batch is gathered on the host into one of two pinned
    buffers and copied asynchronously). On the CPU, None means resident; False takes the
    staging path too, without pinning (so that the path can be tested without a GPU). An epoch's
    order and random draws are made on the CPU at its start and moved to the device at once,
    so no step waits on a small host-to-device copy.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        device: torch.device,
        mean: list[float],
        std: list[float],
        channels_last: bool = False,
        resident: bool | None = None,
        per_image: bool = False,
        size: tuple[int, int] | list[int] | None = None,
    ) -> None:
        self.device = device
        self.images = inputs.ndim == 4
        self.per_image = per_image and self.images
        stored = tuple(inputs.shape[1:3]) if self.images else None
        self.size = tuple(size) if self.images and size is not None and tuple(size) != stored else None
        self.channels_last = channels_last and self.images
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        cuda = device.type == "cuda"
        if cuda and resident is None:
            free, _ = torch.cuda.mem_get_info(device)
            resident = x.numel() * x.element_size() <= free // 4
        self.resident = resident is not False
        if cuda and self.resident:
            x = x.to(device)
        elif not self.resident:
            self._staging = [self._host_buffer((0,), x.dtype) for _ in range(2)]
            self._copied: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0
        self.x = x
        self.y = self._to_device(torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))
        shape = (1, -1, 1, 1) if self.images else (1, -1)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        unit = 255.0 if self.images else 1.0
        self.scale = (1.0 / (unit * std_t)).view(shape).to(device)
        self.shift = (-mean_t / std_t).view(shape).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def _host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype)
        return buf.pin_memory() if self.device.type == "cuda" else buf

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def epoch(
        self,
        batch_size: int,
        generator: torch.Generator,
        augment: tuple[str, ...] = (),
        shift_px: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled, augmented batches of ``batch_size`` (the last partial batch is dropped: batch norm
        needs more than one sample). The shuffle and draws come from ``generator`` (on the CPU: the same
        on every device); ``shard=(rank, size)`` keeps positions rank, rank + size, ... of them."""
        n = len(self)
        order = torch.randperm(n, generator=generator)
        draws = draw_augmentation(n, augment, shift_px, generator) if self.images and augment else {}
        if shard is not None:  # distributed training: as many batches on every rank
            part = slice(shard[0], n - n % shard[1], shard[1])
            order, draws, n = order[part], {k: v[part] for k, v in draws.items()}, n // shard[1]
        order_dev = self._to_device(order)
        draws = {k: self._to_device(v) for k, v in draws.items()}
        for start in range(0, n - batch_size + 1, batch_size):
            part = slice(start, start + batch_size)
            yield self._prepare(order[part], order_dev[part], {k: v[part] for k, v in draws.items()})

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, unaugmented (evaluation)."""
        idx = torch.arange(len(self))
        idx_dev = self._to_device(idx)
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            yield self._prepare(idx[part], idx_dev[part], {})

    def _gather(self, idx: torch.Tensor, idx_dev: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.x[idx_dev]
        # Two pinned buffers in turn: the one refilled now was last copied from two batches ago.
        k = self._turn
        self._turn ^= 1
        copied = self._copied[k]
        if copied is not None:
            copied.synchronize()
        n, row = len(idx), self.x[0].numel()
        if self._staging[k].numel() < n * row:
            self._staging[k] = self._host_buffer((n, *self.x.shape[1:]), self.x.dtype)
        buf = self._staging[k].view(-1)[: n * row].view(n, *self.x.shape[1:])
        torch.index_select(self.x, 0, idx, out=buf)
        if self.device.type != "cuda":
            return buf.clone()  # the buffer is refilled two batches later
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[k] = event
        return out

    def _prepare(
        self, idx: torch.Tensor, idx_dev: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._gather(idx, idx_dev)
        y = self.y[idx_dev]
        if self.images:
            if draws:
                x = augment_images(x, draws)
            x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW view with channels_last strides
            x = x.float() if self.channels_last else x.contiguous().float()
            if self.size is not None:
                smaller = self.size[0] <= x.shape[2] and self.size[1] <= x.shape[3]
                x = nn.functional.interpolate(x, size=self.size, mode="area" if smaller else "bilinear")
        else:
            x = x.float()
        if self.per_image:
            return standardise_per_image(x), y
        return x.mul_(self.scale).add_(self.shift), y


def standardise_per_image(x: torch.Tensor) -> torch.Tensor:
    """Each image and channel to zero mean and unit std (in 0-255 units, +1 keeps flat images
    finite): removes the colour cast and contrast of an image, keeps its shapes."""
    mean = x.mean((2, 3), keepdim=True)
    std = x.std((2, 3), keepdim=True)
    return x.sub_(mean).div_(std + 1.0)


# The six orders of three colour channels.
_CHANNEL_ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def draw_augmentation(
    n: int, augment: tuple[str, ...], shift_px: int, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """The random choices of ``augment`` for ``n`` images, drawn on the CPU.

    ``colour`` shuffles the RGB channels and inverts half the images (for data whose classes
    do not depend on colour); ``flip`` mirrors half of them left-right; ``translate`` and
    ``crop`` shift by up to ``shift_px`` pixels each way.
    """
    draws: dict[str, torch.Tensor] = {}
    if "colour" in augment:
        draws["channels"] = _CHANNEL_ORDERS[torch.randint(0, 6, (n,), generator=generator)]
        draws["invert"] = torch.rand(n, generator=generator) < 0.5
    if "flip" in augment:
        draws["flip"] = torch.rand(n, generator=generator) < 0.5
    if shift_px > 0 and ("translate" in augment or "crop" in augment):
        draws["shift"] = torch.randint(-shift_px, shift_px + 1, (n, 2), generator=generator)
        draws["fill_black"] = torch.full((n,), "crop" in augment)
    return draws


def augment_images(x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply :func:`draw_augmentation`'s choices to a uint8 N x H x W x 3 batch on its device.

    A shift repeats the edge pixels into the gap (``translate``) or fills it with black
    (``crop``, a zero-padded random crop).
    """
    n, h, w, c = x.shape
    device = x.device
    if "channels" in draws:
        x = x.gather(3, draws["channels"][:, None, None, :].expand(n, h, w, c))
        x = torch.where(draws["invert"][:, None, None, None], 255 - x, x)
    if "flip" in draws:
        x = torch.where(draws["flip"][:, None, None, None], x.flip(2), x)
    if "shift" in draws:
        ys = torch.arange(h, device=device)[None, :] + draws["shift"][:, :1]
        xs = torch.arange(w, device=device)[None, :] + draws["shift"][:, 1:]
        rows = torch.arange(n, device=device)[:, None, None]
        out = x[rows, ys.clamp(0, h - 1)[:, :, None], xs.clamp(0, w - 1)[:, None, :]]
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
        black = draws["fill_black"][:, None, None] & ~inside
        x = out.masked_fill(black[..., None], 0)
    return x
