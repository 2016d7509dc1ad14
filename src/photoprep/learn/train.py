"""Training: a classifier on the train split, model selection and early stopping on val.

The hot path has no per-sample Python: a split's pixels are one uint8 tensor (N x H x W x 3,
gathered once from the memory-mapped ``images.npy``); each batch is cut from it with an index
tensor, moved to the device, then shifted / mirrored and normalised there. On CUDA the uint8
split lives on the GPU when it fits in a quarter of the free memory; otherwise batches are
gathered into pinned buffers and copied asynchronously while the GPU works on the previous one.

Randomness: one CPU generator seeded with ``train.seed`` draws the shuffles and augmentation
offsets (so they are the same on every device), and the global torch seed covers weight init
and dropout. Two CPU runs with the same seed give identical weights; on CUDA
``train.deterministic`` turns on deterministic algorithms.

Checkpoints: ``last.pt`` after every epoch (model, optimizer, generator states, history, best
so far) and ``best.pt`` when val improves. ``train.resume`` continues from ``last.pt`` when it
was made with the same params (``epochs``, ``early_stopping``, ``device``, ``amp`` aside) and
data; a resumed run ends with the same weights as an uninterrupted one.

A model file (``models/model.pt``) is ``{"state_dict": ..., "meta": ...}`` with plain-typed
metadata, loadable with ``torch.load(path, weights_only=True)``; see :func:`load_model`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from photoprep.dataset.split import fingerprint as split_fingerprint
from photoprep.errors import UserError
from photoprep.io import write_bytes
from photoprep.learn import devices, models
from photoprep.learn.devices import device_name
from photoprep.params import TrainParams

MODEL_FORMAT = "photoprep.model/1"
CHECKPOINT_FORMAT = "photoprep.checkpoint/1"
# Params that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume", "epochs", "early_stopping", "device", "amp")

EpochCallback = Callable[[dict[str, float]], None]


# --------------------------------------------------------------------------- data


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


def input_kind(model: str) -> str:
    return "features" if model == "mlp" else "images"


def read_splits_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (run the split stage first: dvc repro split)")
    return json.loads(path.read_text(encoding="utf-8"))


def input_array_path(kind: str, data_dir: Path) -> Path:
    return data_dir / ("features/features.npy" if kind == "features" else "processed/images.npy")


def load_split(
    name: str,
    kind: str,
    classes: list[str],
    data_dir: str | Path = "data",
    expected_fingerprint: str | None = None,
) -> SplitData:
    """Read ``data/splits/<name>.parquet`` and gather its rows of images.npy (or features.npy).

    The split's fingerprint is recomputed and must equal ``expected_fingerprint`` when given
    (the one in reports/splits.json): a stale split table is a user error, not a silent mix-up.
    """
    data_dir = Path(data_dir)
    table_path = data_dir / "splits" / f"{name}.parquet"
    array_path = input_array_path(kind, data_dir)
    if not array_path.exists():
        raise UserError(f"{array_path} not found (run the earlier stages first: dvc repro)")
    table, fp = read_split_table(table_path, expected_fingerprint)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(table["label"].astype(str)) - set(index))
    if unknown:
        raise UserError(f"{table_path}: label {unknown[0]!r} is not a class of reports/splits.json")
    labels = np.array([index[str(v)] for v in table["label"]], dtype=np.int64)
    inputs = gather_rows(kind, table["row"].to_numpy(dtype=np.int64), array_path, table_path)
    return SplitData(name, table, inputs, labels, fp)


def read_split_table(table_path: Path, expected_fingerprint: str | None = None) -> tuple[pd.DataFrame, str]:
    """A split table and its fingerprint, which must equal ``expected_fingerprint`` when given."""
    if not table_path.exists():
        raise UserError(f"{table_path} not found (run the earlier stages first: dvc repro)")
    table = pd.read_parquet(table_path)
    fp = split_fingerprint(table)
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise UserError(
            f"{table_path} does not match its fingerprint in reports/splits.json "
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


def load_data(
    p: TrainParams, data_dir: str | Path = "data", splits_report: str | Path = "reports/splits.json"
) -> TrainData:
    """The train and val splits of the pipeline, as the model in ``p`` wants them."""
    report = read_splits_report(splits_report)
    classes = [str(c) for c in report["classes"]]
    fps = dict(report.get("fingerprints", {}))
    kind = input_kind(p.model)
    train = load_split("train", kind, classes, data_dir, fps.get("train"))
    val = load_split("val", kind, classes, data_dir, fps.get("val"))
    if len(train) == 0:
        raise UserError("data/splits/train.parquet is empty: nothing to train on")
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
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled, augmented batches of ``batch_size`` (the last partial batch is dropped:
        batch norm needs more than one sample). The shuffle and the draws come from
        ``generator`` (on the CPU: the same on every device)."""
        n = len(self)
        order = torch.randperm(n, generator=generator)
        draws = draw_augmentation(n, augment, shift_px, generator) if self.images and augment else {}
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
        if self._copied[k] is not None:
            self._copied[k].synchronize()
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


# --------------------------------------------------------------------------- device


def pick_device(choice: str) -> torch.device:
    """:func:`photoprep.learn.devices.pick_device` for ``train.device``, and with ``auto`` on a machine
    without CUDA one warning on stderr: training is where the CPU costs most."""
    device = devices.pick_device(choice, "train.device")
    if choice == "auto" and device.type == "cpu":
        print(
            "photoprep: warning: no CUDA device found; training on the CPU (train.device: auto)",
            file=sys.stderr,
        )
    return device


def _configure(device: torch.device, p: TrainParams) -> None:
    if device.type != "cuda":
        return
    if p.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        print("photoprep: warning: this GPU has no bf16; using fp16 (train.amp)", file=sys.stderr)
        return torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


# --------------------------------------------------------------------------- optimisation


def peak_lr(p: TrainParams) -> float:
    """``train.lr``, or the model's default when it is null."""
    return p.lr if p.lr is not None else models.default_lr(p.model)


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = peak_lr(p)
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0)
    if p.optimizer == "adam":
        # Adam's own weight_decay is L2 in the gradient; AdamW decouples it.
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(p: TrainParams, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate at an optimiser step: a pure function, so resuming needs no state.

    step: x ``gamma`` every ``step_size`` epochs; cosine: from lr down to 0; onecycle: a
    cosine warm-up from lr/25 to lr over the first 30 % of steps, then cosine down to lr/25e4
    (torch's OneCycleLR defaults, without the momentum cycle).
    """
    lr = peak_lr(p)
    if p.schedule == "step":
        return lr * p.gamma ** (step // steps_per_epoch // p.step_size)
    if p.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    if p.schedule == "onecycle":
        start, end = lr / 25, lr / 25e4
        warm = max(1, int(0.3 * total_steps))
        if step < warm:
            return start + (lr - start) * (1 - math.cos(math.pi * step / warm)) / 2
        t = min((step - warm) / max(total_steps - warm, 1), 1.0)
        return end + (lr - end) * (1 + math.cos(math.pi * t)) / 2
    return lr


# --------------------------------------------------------------------------- model files


def architecture_for(p: TrainParams, num_classes: int, inputs: np.ndarray) -> dict[str, Any]:
    size = (list(p.image_size) if p.image_size else list(inputs.shape[1:3])) if inputs.ndim == 4 else None
    feats = int(inputs.shape[1]) if inputs.ndim == 2 else None
    return models.architecture(p.model, num_classes, size, feats, p.width, p.depth, p.dropout, p.activation)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically. Saved through a buffer: torch names the archive's inner folder
    after the file, so equal objects give equal bytes wherever they are written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(buffer.getvalue(), path)


def save_model(state_dict: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> None:
    """``{"state_dict", "meta"}`` with torch.save, atomically. ``meta`` must be plain types."""
    atomic_save({"format": MODEL_FORMAT, "state_dict": state_dict, "meta": meta}, Path(path))


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (run the train stage first: dvc repro train)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise UserError(f"{path}: not a photoprep model file (no state_dict and meta)")
    return blob["state_dict"], blob["meta"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[models.Net, dict[str, Any]]:
    """The network of a model file, weights loaded, in eval mode; and its metadata."""
    state, meta = read_model_file(path)
    model = models.build_model(**meta["architecture"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def _checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a local checkpoint: a model file, a training checkpoint or a bare state dict."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"train.init_from: {path} not found (a local checkpoint; nothing is downloaded)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"train.init_from: {path} is not a checkpoint ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            return blob[key]
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise UserError(f"train.init_from: {path} holds no state dict")


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # the best model (by val), on the CPU
    meta: dict[str, Any]
    history: list[dict[str, float]]
    perf: dict[str, Any]  # wall-clock figures: kept out of the model file


def _compat_key(p: TrainParams, data: TrainData) -> str:
    settings = {k: v for k, v in p.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    text = json.dumps(
        {
            "params": settings,
            "classes": data.classes,
            "train": data.train.fingerprint,
            "val": data.val.fingerprint,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT else None


def _evaluate_split(
    model: nn.Module, batches: Batches, batch_size: int, amp: torch.dtype | None
) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of a split."""
    if len(batches) == 0:
        return math.nan, math.nan
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=batches.device)
    correct = torch.zeros((), dtype=torch.int64, device=batches.device)
    autocast = torch.autocast(batches.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    with torch.no_grad(), autocast:
        for x, y in batches.in_order(batch_size):
            out = model(x).float()
            loss += nn.functional.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
    n = len(batches)
    return float(loss) / n, int(correct) / n


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    amp: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a prepared batch; returns the (detached) logits and loss."""
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = model(x)
        loss = criterion(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return out.detach(), loss.detach()


def _better(monitor: str, record: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    if monitor == "val_loss":
        return record["val_loss"] < best["val_loss"]
    return record["val_accuracy"] > best["val_accuracy"] or (
        record["val_accuracy"] == best["val_accuracy"] and record["val_loss"] < best["val_loss"]
    )


@dataclass
class _Progress:
    """What a checkpoint carries besides weights and optimiser: enough to resume exactly."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False


@dataclass
class _Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device

    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        return rng

    def save_last(self, path: Path, key: str, progress: _Progress) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "key": key,
                "model": _cpu_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": self.rng_state(),
                "history": progress.history,
                "best": progress.best,
                "best_model": progress.best_state,
                "since_best": progress.since_best,
                "stopped_early": progress.stopped_early,
            },
            path,
        )

    def restore(self, path: Path, key: str) -> _Progress | None:
        """Load ``last.pt`` when it exists and was made with the same params and data."""
        ckpt = read_checkpoint(path)
        if ckpt is None:
            print(f"photoprep: no checkpoint at {path}; training from the start", file=sys.stderr)
            return None
        if ckpt["key"] != key:
            print(
                f"photoprep: warning: {path} was made with other params or data; training from the start",
                file=sys.stderr,
            )
            return None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.generator.set_state(ckpt["rng"]["generator"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        progress = _Progress(
            history=[dict(r) for r in ckpt["history"]],
            best=dict(ckpt["best"]) if ckpt.get("best") else None,
            best_state=ckpt.get("best_model"),
            since_best=int(ckpt["since_best"]),
            stopped_early=bool(ckpt["stopped_early"]),
        )
        print(f"photoprep: resuming from {path} after epoch {len(progress.history)}", file=sys.stderr)
        return progress


def _build_model(
    p: TrainParams, data: TrainData
) -> tuple[models.Net, dict[str, Any], dict[str, Any] | None, int]:
    """The network (seeded), its architecture, what init_from loaded, and the frozen parameter count."""
    torch.manual_seed(p.seed)
    arch = architecture_for(p, len(data.classes), data.train.inputs)
    model = models.build_model(**arch)
    transfer: dict[str, Any] | None = None
    if p.init_from:
        loaded, skipped = models.load_matching(model, _checkpoint_state(p.init_from))
        if not loaded:
            raise UserError(f"train.init_from: no tensor of {p.init_from} fits model {p.model!r}")
        transfer = {"init_from": p.init_from, "loaded": len(loaded), "skipped": len(skipped)}
    try:
        frozen = models.freeze_blocks(model, p.freeze)
    except ValueError as exc:
        raise UserError(f"train.freeze: {exc}") from None
    return model, arch, transfer, frozen


def fit(
    data: TrainData,
    p: TrainParams,
    checkpoint_dir: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    resident: bool | None = None,
) -> TrainResult:
    """Train ``p.model`` on ``data.train``; pick the best epoch and stop early on ``data.val``.

    With ``checkpoint_dir``, ``last.pt`` is written after every epoch and ``best.pt`` when val
    improves; with ``p.resume``, training continues from ``last.pt``. ``on_epoch`` gets each
    epoch's record (epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr) once its
    checkpoint is written; on resume the epochs already done are replayed to it first, so a
    logger sees the whole history.
    """
    device = pick_device(p.device)
    _configure(device, p)
    amp = amp_dtype(device, p.amp)
    has_val = len(data.val) > 0
    if not has_val:
        print(
            "photoprep: warning: the val split is empty; keeping the last epoch, no early stopping",
            file=sys.stderr,
        )

    model, arch, transfer, frozen = _build_model(p, data)
    model = model.to(device)
    if p.channels_last and data.kind == "images":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, p)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    trainer = _Trainer(model, optimizer, scaler, torch.Generator().manual_seed(p.seed), device)
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)

    mean, std = input_stats(data.train.inputs)
    prep = {
        "channels_last": p.channels_last,
        "resident": resident,
        "per_image": p.normalize == "image",
        "size": arch["input_size"],
    }
    train_b = Batches(data.train.inputs, data.train.labels, device, mean, std, **prep)
    val_b = Batches(data.val.inputs, data.val.labels, device, mean, std, **prep)
    batch_size = min(p.batch_size, len(train_b))
    steps = len(train_b) // batch_size  # full batches per epoch
    augment = tuple(p.augment) if data.kind == "images" else ()

    key = _compat_key(p, data)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    restored = trainer.restore(ckpt_dir / "last.pt", key) if p.resume and ckpt_dir is not None else None
    progress = restored or _Progress()
    start_epoch = len(progress.history)
    if on_epoch is not None:
        for record in progress.history:
            on_epoch(dict(record))

    train_seconds, images_seen = 0.0, 0
    for epoch in range(start_epoch, p.epochs):
        if progress.stopped_early:
            break
        started = time.perf_counter()
        models.train_mode(model, p.freeze)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lr = peak_lr(p)
        for b, (x, y) in enumerate(train_b.epoch(batch_size, trainer.generator, augment, p.shift_px)):
            lr = lr_at(p, epoch * steps + b, steps * p.epochs, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out, loss = train_step(model, x, y, optimizer, scaler, criterion, amp)
            loss_sum += loss.double() * len(y)  # summed on the device: no sync per step
            correct += (out.argmax(1) == y).sum()
        seen = steps * batch_size
        record = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen}
        train_seconds += time.perf_counter() - started
        images_seen += seen
        val_loss, val_acc = _evaluate_split(model, val_b, max(batch_size, 256), amp)
        record.update({"val_loss": val_loss, "val_accuracy": val_acc, "lr": lr})
        record = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}
        progress.history.append(record)

        if not has_val or _better(p.monitor, record, progress.best):
            progress.best = {k: record[k] for k in ("epoch", "val_loss", "val_accuracy")}
            progress.best_state = _cpu_state(model)
            progress.since_best = 0
            if ckpt_dir is not None:
                atomic_save(
                    {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": progress.best_state},
                    ckpt_dir / "best.pt",
                )
        else:
            progress.since_best += 1
        progress.stopped_early = has_val and 0 < p.early_stopping <= progress.since_best
        if ckpt_dir is not None:
            trainer.save_last(ckpt_dir / "last.pt", key, progress)
        if on_epoch is not None:
            on_epoch(dict(record))
        if progress.stopped_early:
            print(
                f"photoprep: early stop after epoch {epoch}: "
                f"no better {p.monitor} for {p.early_stopping} epochs",
                file=sys.stderr,
            )

    best = progress.best
    meta = {
        "format": MODEL_FORMAT,
        "architecture": arch,
        "classes": list(data.classes),
        "input": data.kind,
        "input_size": arch["input_size"],
        "stored_size": list(data.train.inputs.shape[1:3]) if data.kind == "images" else None,
        "in_features": arch["in_features"],
        "normalization": {
            "kind": p.normalize if data.kind == "images" else "dataset",
            "mean": mean,
            "std": std,
            "scale": "x/255" if data.kind == "images" else "x",
        },
        "parameters": models.count_parameters(model),
        "frozen_parameters": int(frozen),
        "transfer": transfer,
        "params": p.model_dump(mode="json"),
        "lr": peak_lr(p),
        "fingerprints": {
            "train": data.train.fingerprint,
            "val": data.val.fingerprint,
            "test": data.fingerprints.get("test", ""),
        },
        "best_epoch": int(best["epoch"]) if best else len(progress.history) - 1,
        "best_val": (
            {"loss": best["val_loss"], "accuracy": best["val_accuracy"]} if best and has_val else None
        ),
        "epochs_run": len(progress.history),
        "stopped_early": bool(progress.stopped_early),
        "trained_on": device.type,
        # CPU kernels may split reductions by thread: `verify --retrain` uses the same count.
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__.split("+")[0],
    }
    perf = {
        "device": device_name(device),
        "train_seconds": round(train_seconds, 3),
        "epochs_this_run": len(progress.history) - start_epoch,
        "train_images_per_s": round(images_seen / train_seconds, 1) if train_seconds else None,
    }
    state = progress.best_state if progress.best_state is not None else _cpu_state(model)
    return TrainResult(state, meta, progress.history, perf)


# --------------------------------------------------------------------------- logging


class LiveLog:
    """Per-epoch metrics to dvclive (``train/loss``, ``train/accuracy``, ``val/loss``,
    ``val/accuracy``, ``lr``; step = epoch). dvclive writes no dvc.yaml and saves no
    experiment: the pipeline's dvc.yaml declares the plots."""

    def __init__(self, directory: str | Path = "dvclive") -> None:
        from dvclive import Live  # only the stage logs; the library runs without dvclive

        self.live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)

    def __call__(self, record: dict[str, float]) -> None:
        self.live.step = int(record["epoch"])
        for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            split, metric = name.split("_", 1)
            value = record[name]
            if not (isinstance(value, float) and math.isnan(value)):
                self.live.log_metric(f"{split}/{metric}", value)
        self.live.log_metric("lr", record["lr"])
        self.live.next_step()

    def close(self, result: TrainResult | None = None) -> None:
        if result is not None and result.meta.get("best_val"):
            self.live.summary["best"] = {
                "epoch": result.meta["best_epoch"],
                "val_loss": result.meta["best_val"]["loss"],
                "val_accuracy": result.meta["best_val"]["accuracy"],
            }
        self.live.end()
