"""Training: a classifier on the train split, model selection and early stopping on val.

:func:`fit` is a short loop over named steps::

    prepare                     device, seeded model (timm's, with its pretrained weights, or a
                                small net), optimiser, schedule, batches, resume from last.pt
    for each epoch:
        train_epoch             which layers train (head first, then all), one shuffled pass over
                                train with mixup when asked, the LR schedule per step
        validate                loss and accuracy on val (no smoothing), the epoch's record
        select                  the best epoch by ``train.monitor``; early stopping
        checkpoint              best.pt when val improved, last.pt always
    finish                      the best weights, the model file's metadata, wall-clock figures

Data (splits, batches, augmentation) is :mod:`photoprep.learn.data`; model files and checkpoints
are :mod:`photoprep.learn.checkpoint`; the networks are :mod:`photoprep.learn.models`; the
optimiser, schedule, mixup and phases are :mod:`photoprep.learn.optim` (timm's helpers); the
starting weights of ``train.pretrained`` come from :mod:`photoprep.learn.pretrained`.

Randomness: one CPU generator seeded with ``train.seed`` draws the shuffles and augmentation
offsets (so they are the same on every device), the global torch seed covers weight init and
dropout, and numpy's generator, seeded per epoch, mixup's draws. Two CPU runs with the same seed
give identical weights (on any x86-64 CPU with AVX2: :mod:`photoprep.portable`); on CUDA
``train.deterministic`` turns on deterministic algorithms.

Why one module
    What is left here is the loop itself: the device setup, the step, and the loop's steps over
    one shared state (``_Run``), with what a model file records of the run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from photoprep import portable
from photoprep.core.errors import UserError
from photoprep.core.params import TrainParams
from photoprep.learn import backbones, devices, models, optim
from photoprep.learn.checkpoint import (
    MODEL_FORMAT,
    Progress,
    Resumable,
    compat_key,
    cpu_state,
    read_init_weights,
    restore_checkpoint,
    save_best,
    save_last,
)
from photoprep.learn.data import Batches, Prep, TrainData, input_stats
from photoprep.learn.devices import device_name
from photoprep.learn.models import Architecture
from photoprep.learn.pretrained import Pretrained

if TYPE_CHECKING:
    from photoprep.learn.distributed import World

__all__ = [
    "EpochCallback",
    "TrainResult",
    "amp_dtype",
    "architecture_for",
    "fit",
    "input_prep",
    "train_step",
    "training_device",
]

EpochCallback = Callable[[dict[str, float]], None]


# --------------------------------------------------------------------------- device


def training_device(choice: str) -> torch.device:
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


# --------------------------------------------------------------------------- what the model sees


def architecture_for(
    p: TrainParams, num_classes: int, inputs_shape: tuple[int, ...], pretrained: Pretrained | None = None
) -> Architecture:
    """The architecture of ``p.model`` for inputs of this shape (images: N x H x W x 3, features:
    N x D): ``train.image_size`` as given, the stored size (null), or the pretrained weights' own
    input size (auto)."""
    size = None
    if len(inputs_shape) == 4:
        stored = (int(inputs_shape[1]), int(inputs_shape[2]))
        if p.image_size == "auto":
            size = tuple(pretrained.data_config["input_size"]) if pretrained is not None else stored
        else:
            size = tuple(p.image_size) if p.image_size else stored
    feats = int(inputs_shape[1]) if len(inputs_shape) == 2 else None  # an mlp on images: 3 x H x W
    return Architecture.of(
        p.model,
        num_classes,
        size,
        feats,
        width=p.width,
        depth=p.depth,
        dropout=p.dropout,
        activation=p.activation,
        **({"drop_path": p.drop_path} if p.is_timm else {}),
    )


def input_prep(
    p: TrainParams, data: TrainData, arch: Architecture, pretrained: Pretrained | None
) -> tuple[str, Prep]:
    """How the inputs are normalised (``train.normalize``; auto: as the pretrained weights were,
    when there are any, else each image by its own statistics) and resized; the normalisation's kind."""
    if data.kind == "features":
        mean, std = input_stats(data.train.inputs)
        return "dataset", Prep(mean, std)
    cfg = pretrained.data_config if pretrained else None
    kind = p.normalize if p.normalize != "auto" else (cfg.get("normalize", "pretrained") if cfg else "image")
    interpolation = cfg.get("interpolation") if cfg else None
    if kind == "pretrained":
        if not p.is_timm:
            raise UserError(f"train.normalize: pretrained needs a timm/ model (got {p.model})")
        cfg = cfg or backbones.data_config(backbones.timm_name(p.model))
        mean, std, interpolation = cfg["mean"], cfg["std"], cfg["interpolation"]
    elif kind == "dataset":
        mean, std = input_stats(data.train.inputs)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    prep = Prep(
        mean=[round(float(v), 8) for v in mean],
        std=[round(float(v), 8) for v in std],
        per_image=kind == "image",
        size=arch.input_size,
        interpolation=interpolation,
        channels_last=p.channels_last,
    )
    return kind, prep


# --------------------------------------------------------------------------- steps


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # the best model (by val), on the CPU
    meta: dict[str, Any]
    history: list[dict[str, float]]
    perf: dict[str, Any]  # wall-clock figures: kept out of the model file


def evaluate_split(
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
    """One optimiser step on a prepared batch (``y``: class indices, or soft targets after mixup);
    returns the (detached) logits and loss. ``amp`` runs the forward pass under autocast on the
    batch's device (CUDA in the stages; the CPU too, where torch allows it: the tests)."""
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


@dataclass(frozen=True)
class _Start:
    """The network as it starts: built and seeded, with its starting weights, and what a model file
    records of them."""

    model: nn.Module
    arch: Architecture
    transfer: dict[str, Any] | None  # train.init_from: what was loaded
    pretrained: dict[str, Any] | None  # train.pretrained: where the weights came from
    frozen: frozenset[str]  # train.freeze: parameter names frozen for the whole run


def _build_model(p: TrainParams, data: TrainData, pretrained: Pretrained | None) -> _Start:
    torch.manual_seed(p.seed)
    arch = architecture_for(p, len(data.classes), data.train.inputs.shape, pretrained)
    if p.is_timm:
        backbones.check_architecture(p.model)
    model = models.build_model(arch, pretrained.state_dict if pretrained is not None else None)
    transfer: dict[str, Any] | None = None
    if p.init_from:
        loaded, skipped = models.load_matching(model, read_init_weights(p.init_from))
        if not loaded:
            raise UserError(f"train.init_from: no tensor of {p.init_from} fits model {p.model!r}")
        transfer = {"init_from": p.init_from, "loaded": len(loaded), "skipped": len(skipped)}
    try:
        frozen = models.frozen_names(model, p.freeze) if p.freeze else set()
    except ValueError as exc:
        raise UserError(f"train.freeze: {exc}") from None
    summary = pretrained.summary() if pretrained is not None else None
    return _Start(model, arch, transfer, summary, frozenset(frozen))


@dataclass
class _Run:
    """What the steps of one :func:`fit` share. Built by :func:`_prepare`; its methods are the steps."""

    p: TrainParams
    data: TrainData
    device: torch.device
    amp: torch.dtype | None
    start: _Start
    optimizer: torch.optim.Optimizer
    schedule: optim.Schedule
    mixup: tuple[Any, nn.Module] | None  # timm's Mixup and its soft-target loss, or None
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    criterion: nn.Module
    normalization: str
    prep: Prep
    train_batches: Batches
    val_batches: Batches
    batch_size: int
    steps: int  # full batches per epoch
    augment: tuple[str, ...]
    key: str
    checkpoint_dir: Path | None
    progress: Progress
    start_epoch: int
    train_seconds: float = 0.0
    images_seen: int = 0
    world: World | None = None  # distributed training (photoprep.learn.distributed); None: one process
    trainee: nn.Module | None = None  # what the steps run: the DDP wrapper of ``model``, or None
    trains: frozenset[str] = frozenset()  # the parameters the wrapper was built for

    @property
    def model(self) -> nn.Module:
        return self.start.model

    @property
    def has_val(self) -> bool:
        return len(self.data.val) > 0

    def _phase(self, epoch: int) -> nn.Module:
        """Set which parameters train in ``epoch`` (:func:`optim.trainable`); what the steps run
        (DDP wraps again when that set changed: it syncs the gradients of the ones it was built for)."""
        optim.trainable(self.model, self.p, epoch, set(self.start.frozen))
        models.train_mode(self.model)
        if self.world is None:
            return self.model
        trains = frozenset(n for n, t in self.model.named_parameters() if t.requires_grad)
        if self.trainee is None or trains != self.trains:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.trainee = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self.trains = trains
        return self.trainee

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One shuffled pass over the train split: its record (loss, accuracy) and the last LR."""
        p, device = self.p, self.device
        started = time.perf_counter()
        net = self._phase(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lr = optim.peak_lr(p)
        world = self.world
        shard = world.shard() if world is not None else None
        batches = self.train_batches.epoch(self.batch_size, self.generator, self.augment, p.shift_px, shard)
        with self.schedule.mixing(epoch):
            for b, (x, y) in enumerate(batches):
                lr = self.schedule.at(epoch * self.steps + b)
                if self.mixup is not None:
                    mix, soft_loss = self.mixup
                    x, target = mix(x, y)
                    out, loss = train_step(net, x, target, self.optimizer, self.scaler, soft_loss, self.amp)
                else:
                    out, loss = train_step(net, x, y, self.optimizer, self.scaler, self.criterion, self.amp)
                loss_sum += loss.double() * len(y)  # summed on the device: no sync per step
                correct += (out.argmax(1) == y).sum()
        seen = self.steps * self.batch_size
        if world is not None:  # every rank's shard: the epoch's figures over all of them
            loss_sum, correct, seen = world.sum(loss_sum), world.sum(correct), seen * world.size
        record = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen}
        self.train_seconds += time.perf_counter() - started
        self.images_seen += seen
        return record, lr

    def validate(self, record: dict[str, float], lr: float) -> dict[str, float]:
        """The epoch's whole record, rounded, with val loss and accuracy; appended to the history."""

        def score() -> tuple[float, float]:
            return evaluate_split(self.model, self.val_batches, max(self.batch_size, 256), self.amp)

        # Distributed: rank 0 scores (its weights are the ones kept), the others take its figures.
        val_loss, val_acc = score() if self.world is None else self.world.from_main(score, 2)
        record.update({"val_loss": val_loss, "val_accuracy": val_acc, "lr": lr})
        record = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}
        self.progress.history.append(record)
        return record

    def select(self, record: dict[str, float]) -> bool:
        """Keep this epoch's weights when val improved (always without val); count towards early
        stopping otherwise. Returns whether it improved."""
        progress = self.progress
        improved = not self.has_val or _better(self.p.monitor, record, progress.best)
        if improved:
            progress.best = {k: record[k] for k in ("epoch", "val_loss", "val_accuracy")}
            progress.best_state = cpu_state(self.model)
            progress.since_best = 0
        else:
            progress.since_best += 1
        progress.stopped_early = self.has_val and 0 < self.p.early_stopping <= progress.since_best
        return improved

    def checkpoint(self, epoch: int, improved: bool) -> None:
        """``best.pt`` when val improved, ``last.pt`` after every epoch (with a checkpoint folder)."""
        if self.checkpoint_dir is None or (self.world is not None and not self.world.is_main):
            return
        if improved and self.progress.best_state is not None:
            save_best(self.checkpoint_dir / "best.pt", epoch, self.progress.best_state)
        parts = Resumable(self.model, self.optimizer, self.scaler, self.generator, self.device)
        save_last(self.checkpoint_dir / "last.pt", self.key, parts, self.progress)

    def finish(self) -> TrainResult:
        """The best weights (the last ones when nothing was selected), their metadata and perf."""
        p, data, progress = self.p, self.data, self.progress
        arch = self.start.arch.to_dict()
        best = progress.best
        images = data.kind == "images"
        meta = {
            "format": MODEL_FORMAT,
            "architecture": arch,
            "classes": list(data.classes),
            "input": data.kind,
            "input_size": arch["input_size"],
            "stored_size": list(data.train.inputs.shape[1:3]) if images else None,
            "in_features": arch["in_features"],
            "normalization": {
                "kind": self.normalization,
                "mean": self.prep.mean,
                "std": self.prep.std,
                "scale": "x/255" if images else "x",
            },
            "interpolation": self.prep.interpolation,
            "parameters": models.count_parameters(self.model),
            "frozen_parameters": int(
                sum(t.numel() for n, t in self.model.named_parameters() if n in self.start.frozen)
            ),
            "transfer": self.start.transfer,
            "pretrained": self.start.pretrained,
            "params": p.recorded(),
            "lr": optim.peak_lr(p),
            "fingerprints": {
                "train": data.train.fingerprint,
                "val": data.val.fingerprint,
                "test": data.fingerprints.get("test", ""),
            },
            "best_epoch": int(best["epoch"]) if best else len(progress.history) - 1,
            "best_val": (
                {"loss": best["val_loss"], "accuracy": best["val_accuracy"]}
                if best and self.has_val
                else None
            ),
            "epochs_run": len(progress.history),
            "stopped_early": bool(progress.stopped_early),
            "trained_on": self.device.type,
            # CPU kernels may split reductions by thread: `verify --retrain` uses the same count.
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            # What the CPU math was pinned to (photoprep.portable); the CPU model goes to perf,
            # since the model file's bytes must be the same on every machine.
            "cpu_math": portable.settings() if self.device.type == "cpu" else None,
            "torch": torch.__version__.split("+")[0],
        }
        seconds = self.train_seconds
        perf = {
            "device": device_name(self.device),
            "cpu": portable.describe() if self.device.type == "cpu" else None,
            "train_seconds": round(seconds, 3),
            "epochs_this_run": len(progress.history) - self.start_epoch,
            "train_images_per_s": round(self.images_seen / seconds, 1) if seconds else None,
        }
        if self.world is not None:  # images_seen counts every rank's: the run's throughput
            perf |= {"ranks": self.world.size, "backend": self.world.backend}
        state = progress.best_state if progress.best_state is not None else cpu_state(self.model)
        return TrainResult(state, meta, progress.history, perf)


def _prepare(
    data: TrainData,
    p: TrainParams,
    checkpoint_dir: str | Path | None,
    resident: bool | None,
    world: World | None = None,
    pretrained: Pretrained | None = None,
) -> _Run:
    """Device, seeded model, optimiser, schedule, batches; restored from ``last.pt`` when ``p.resume``."""
    device = training_device(p.device) if world is None else world.device
    _configure(device, p)
    amp = amp_dtype(device, p.amp)
    if len(data.val) == 0:
        print(
            "photoprep: warning: the val split is empty; keeping the last epoch, no early stopping",
            file=sys.stderr,
        )

    start = _build_model(p, data, pretrained)
    model = start.model.to(device)
    if p.channels_last and data.kind == "images":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
    optimizer = optim.make_optimizer(model, p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    generator = torch.Generator().manual_seed(p.seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)

    normalization, prep = input_prep(p, data, start.arch, pretrained)
    train_b = Batches(data.train.inputs, data.train.labels, device, prep, resident)
    val_b = Batches(data.val.inputs, data.val.labels, device, prep, resident)
    shard_size = len(train_b) // (world.size if world is not None else 1)
    if world is not None and shard_size == 0:
        raise UserError(f"train.nproc: {world.size} ranks but {len(train_b)} train images")
    batch_size = min(p.batch_size, shard_size)
    if (p.mixup or p.cutmix) and batch_size % 2:
        batch_size -= 1  # mixup pairs each image with another of its batch
    steps = shard_size // batch_size

    key = compat_key(p, data)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    restored = None
    if p.resume and ckpt_dir is not None:
        parts = Resumable(model, optimizer, scaler, generator, device)
        restored = restore_checkpoint(ckpt_dir / "last.pt", key, parts)
    progress = restored or Progress()
    if world is not None:
        world.agree(len(progress.history), "the epochs resumed (is models/checkpoints shared?)")
    return _Run(
        p=p,
        data=data,
        device=device,
        amp=amp,
        start=start,
        optimizer=optimizer,
        schedule=optim.Schedule(p, optimizer, steps),
        mixup=optim.make_mixup(p, len(data.classes)),
        scaler=scaler,
        generator=generator,
        criterion=criterion,
        normalization=normalization,
        prep=prep,
        train_batches=train_b,
        val_batches=val_b,
        batch_size=batch_size,
        steps=steps,
        augment=tuple(p.augment) if data.kind == "images" else (),
        key=key,
        checkpoint_dir=ckpt_dir,
        progress=progress,
        start_epoch=len(progress.history),
        world=world,
    )


def fit(
    data: TrainData,
    p: TrainParams,
    checkpoint_dir: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    resident: bool | None = None,
    world: World | None = None,
    pretrained: Pretrained | None = None,
) -> TrainResult:
    """Train ``p.model`` on ``data.train``; pick the best epoch and stop early on ``data.val``.

    ``pretrained``: the starting weights of ``train.pretrained``, as the pretrained stage fetched
    them (:func:`photoprep.learn.pretrained.load_fetched`); timm loads them, all but the classifier.

    With ``checkpoint_dir``, ``last.pt`` is written after every epoch and ``best.pt`` when val
    improves; with ``p.resume``, training continues from ``last.pt``. ``on_epoch`` gets each
    epoch's record (epoch, train_loss, train_accuracy, val_loss, val_accuracy, lr) once its
    checkpoint is written; on resume the epochs already done are replayed to it first, so a
    logger sees the whole history.

    ``world`` (:func:`photoprep.learn.distributed.join`): this process is one rank of a
    DistributedDataParallel run of ``world.size`` ranks; every rank calls ``fit`` alike, and
    only rank 0 should get ``on_epoch`` and write what it returns. ``p.nproc`` is recorded as
    ``world.size``.
    """
    if world is not None:
        p = p.model_copy(update={"nproc": world.size})
    if p.pretrained is not None and pretrained is None:
        raise UserError(f"train.pretrained: {p.pretrained} was not fetched (run the pretrained stage first)")
    run = _prepare(data, p, checkpoint_dir, resident, world, pretrained)
    for done in run.progress.history:
        if on_epoch is not None:
            on_epoch(dict(done))
    for epoch in range(run.start_epoch, p.epochs):
        if run.progress.stopped_early:
            break
        record, lr = run.train_epoch(epoch)
        record = run.validate(record, lr)
        run.checkpoint(epoch, run.select(record))
        if on_epoch is not None:
            on_epoch(dict(record))
        if run.progress.stopped_early and (world is None or world.is_main):
            print(
                f"photoprep: early stop after epoch {epoch}: "
                f"no better {p.monitor} for {p.early_stopping} epochs",
                file=sys.stderr,
            )
    return run.finish()
