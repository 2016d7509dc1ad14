"""The learn room's data: split tables and their arrays, as the models want them, cut into batches.

A split is read from its table (``data/splits/<name>.parquet``, whose fingerprint must equal the one
in ``reports/splits.json``); the rows it names stay in the memory-mapped chunks of
``data/processed/images`` (uint8 N x H x W x 3) or ``data/features/features`` (float32 N x D), read
when a batch needs them (:class:`Rows`): a split of 224 px photographs is never loaded whole. Train,
evaluate, predict, introspect, embed and verify all read splits through here, with the paths of a
:class:`~photoprep.core.layout.Layout`.

The hot path has no per-sample Python. :class:`Batches` cuts each batch with an index tensor,
moves it to the device, then shifts / mirrors, resizes and normalises it there. A split of at
most :data:`RESIDENT_BYTES` is read once into one uint8 tensor (on CUDA: onto the GPU when it
fits in a quarter of the free memory); a larger one is read batch by batch from the memory map
into two pinned buffers in turn, each copied asynchronously while the GPU works on the other.
Both paths give the same batches, byte for byte. Augmentation draws come from a CPU generator,
so they are the same on every device.

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

from photoprep.core.chunked import ChunkedArray
from photoprep.core.errors import UserError
from photoprep.core.io import read_json
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import TrainParams
from photoprep.dataset.split import fingerprint as split_fingerprint

__all__ = [
    "RESIDENT_BYTES",
    "Batches",
    "Prep",
    "Rows",
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
    "resize",
    "standardise_per_image",
]


RESIDENT_BYTES = 1 << 30  # a split up to this size is read into memory once; larger ones per batch


# --------------------------------------------------------------------------- splits


class Rows:
    """Rows ``rows`` of an array (memory-mapped), in that order, read only when asked for.

    It answers ``len``, ``shape``, ``ndim``, ``dtype`` and ``nbytes`` like an array; indexing
    with an int gives one row, with a slice or an index array a fresh array of those rows, read
    in sorted order (a sequential read of the memory map), then put back in the asked order.
    ``np.asarray(rows)`` reads them all.
    """

    def __init__(self, array: np.ndarray | ChunkedArray, rows: np.ndarray) -> None:
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    @property
    def ndim(self) -> int:
        return int(self.array.ndim)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(len(self.rows) * self.array[:1].nbytes)

    def take(self, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows at ``positions`` (of this split), into ``out`` when given."""
        wanted = self.rows[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(wanted, kind="stable")
        if out is None:
            out = np.empty((len(wanted), *self.array.shape[1:]), dtype=self.array.dtype)
        out[order] = self.array[wanted[order]]
        return out

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return np.asarray(self.array[self.rows[key]])
        return self.take(np.arange(len(self.rows))[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.take(np.arange(len(self.rows)))
        return whole if dtype is None else whole.astype(dtype, copy=False)


@dataclass
class SplitData:
    """One split: its table, its inputs (rows of the uint8 N x H x W x 3 images or the float32
    N x D features, read on demand), its labels as class indices, and its fingerprint."""

    name: str
    table: pd.DataFrame
    inputs: Rows
    labels: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_arrays(cls, name: str, table: pd.DataFrame, inputs: np.ndarray, labels: np.ndarray) -> SplitData:
        """A split held in memory (rows of ``inputs`` in ``table``'s order), not read from the pipeline."""
        rows = Rows(np.ascontiguousarray(inputs), np.arange(len(inputs)))
        return cls(name, table, rows, np.asarray(labels, dtype=np.int64), split_fingerprint(table))


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
    """Read the split table ``name`` and gather its rows of the images (or the features).

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


def gather_rows(kind: str, rows: np.ndarray, array_path: Path, table_path: Path | str) -> Rows:
    """Rows ``rows`` of the images (uint8 N x H x W x 3) or the features (float32 N x D), in that
    order, memory-mapped (read when used)."""
    array = ChunkedArray(array_path)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(array)):
        raise UserError(f"{table_path}: row {int(rows.max())} is outside {array_path} ({len(array)} rows)")
    if kind == "images" and (array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8):
        raise UserError(f"{array_path}: expected uint8 N x H x W x 3 (got {array.dtype} {array.shape})")
    if kind == "features" and (array.ndim != 2 or array.dtype != np.float32):
        raise UserError(f"{array_path}: expected float32 N x D (got {array.dtype} {array.shape})")
    return Rows(array, rows)


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


def input_stats(inputs: np.ndarray | Rows, chunk: int = 4096) -> tuple[list[float], list[float]]:
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


@dataclass(frozen=True)
class Prep:
    """How a batch is prepared on the device, as the model file records it (``meta``).

    ``mean`` and ``std`` per channel (in [0, 1] units) or per column; ``per_image``: each image
    standardised by its own statistics instead; ``size`` [H, W] the model sees (None: as stored);
    ``interpolation``: how images are resized to it (None: area averaging when shrinking,
    bilinear when enlarging; a pretrained backbone's own, e.g. ``bicubic``, antialiased when
    shrinking); ``channels_last`` memory format.
    """

    mean: list[float]
    std: list[float]
    per_image: bool = False
    size: tuple[int, int] | None = None
    interpolation: str | None = None
    channels_last: bool = False

    @classmethod
    def of(cls, meta: dict[str, Any], channels_last: bool = False) -> Prep:
        """The preparation a model file's metadata describes."""
        norm = meta["normalization"]
        size = meta.get("input_size")
        return cls(
            mean=list(norm["mean"]),
            std=list(norm["std"]),
            per_image=norm.get("kind") == "image",
            size=(int(size[0]), int(size[1])) if size is not None else None,
            interpolation=meta.get("interpolation"),
            channels_last=channels_last,
        )


class Batches:
    """A split's inputs cut into batches by index and prepared on the device (see :class:`Prep`).

    Images stay uint8 until they are on the device; augmentation runs there on uint8, then they
    become float (NCHW, channels_last strides when asked), are resized and normalised.

    ``resident``: read the whole split once (None: when it is at most :data:`RESIDENT_BYTES` and,
    on CUDA, fits in a quarter of the free memory, where it then lives). Otherwise each batch is
    read from the memory map into one of two host buffers in turn (pinned on CUDA, copied
    asynchronously). On the CPU ``resident=False`` takes that path too, so it is tested without a
    GPU. An epoch's order and random draws are made on the CPU at its start and moved to the
    device at once, so no step waits on a small host-to-device copy.
    """

    def __init__(
        self,
        inputs: np.ndarray | Rows,
        labels: np.ndarray,
        device: torch.device,
        prep: Prep,
        resident: bool | None = None,
    ) -> None:
        self.device = device
        self.images = inputs.ndim == 4
        self.per_image = prep.per_image and self.images
        stored = tuple(inputs.shape[1:3]) if self.images else None
        size = (int(prep.size[0]), int(prep.size[1])) if prep.size else None
        self.size = size if self.images and size is not None and size != stored else None
        self.interpolation = prep.interpolation
        self.channels_last = prep.channels_last and self.images
        self.rows = inputs if isinstance(inputs, Rows) else Rows(np.asarray(inputs), np.arange(len(inputs)))
        cuda = device.type == "cuda"
        if resident is None:
            resident = self.rows.nbytes <= RESIDENT_BYTES
            if cuda and resident:
                free, _ = torch.cuda.mem_get_info(device)
                resident = self.rows.nbytes <= free // 4
        self.resident = resident
        self.x: torch.Tensor | None = None
        if resident:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(self.rows)))
            self.x = x.to(device) if cuda else x
        else:
            self._staging = [self._host_buffer((0,)) for _ in range(2)]
            self._copied: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0
        self.y = self._to_device(torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))
        shape = (1, -1, 1, 1) if self.images else (1, -1)
        mean_t = torch.tensor(prep.mean, dtype=torch.float32)
        std_t = torch.tensor(prep.std, dtype=torch.float32)
        # x_norm = (x / 255 - mean) / std = x * scale + shift
        unit = 255.0 if self.images else 1.0
        self.scale = (1.0 / (unit * std_t)).view(shape).to(device)
        self.shift = (-mean_t / std_t).view(shape).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def _host_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        buf = torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(self.rows.dtype)])
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
        if self.x is not None:
            return self.x[idx_dev]
        # Two host buffers in turn: the one refilled now was last copied from two batches ago.
        k = self._turn
        self._turn ^= 1
        copied = self._copied[k]
        if copied is not None:
            copied.synchronize()
        row_shape = self.rows.shape[1:]
        n, row = len(idx), int(np.prod(row_shape))
        if self._staging[k].numel() < n * row:
            self._staging[k] = self._host_buffer((n, *row_shape))
        buf = self._staging[k].view(-1)[: n * row].view(n, *row_shape)
        self.rows.take(idx.numpy(), out=buf.numpy())
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
                x = resize(x, self.size, self.interpolation)
        else:
            x = x.float()
        if self.per_image:
            return standardise_per_image(x), y
        return x.mul_(self.scale).add_(self.shift), y


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str | None = None) -> torch.Tensor:
    """N x C x H x W floats to ``size``: area averaging when shrinking and bilinear when enlarging
    (``interpolation`` None), or the named mode (a pretrained backbone's), antialiased when shrinking."""
    smaller = size[0] <= x.shape[2] and size[1] <= x.shape[3]
    if interpolation is None:
        return nn.functional.interpolate(x, size=size, mode="area" if smaller else "bilinear")
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    if mode == "nearest":
        return nn.functional.interpolate(x, size=size, mode=mode)
    return nn.functional.interpolate(x, size=size, mode=mode, antialias=smaller, align_corners=False)


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
