"""Model files and training checkpoints: what is saved, how, and when a saved file may be trusted.

A **model file** (``models/model.pt`` of the train stage, ``models/dec.pt`` of the cluster stage)
is ``{"format", "state_dict", "meta"}`` with plain-typed metadata, loadable with
``torch.load(path, weights_only=True)`` (no pickled code). ``format`` names what it holds:
:data:`MODEL_FORMAT` (a classifier of :mod:`photoprep.learn.models`) or :data:`DEC_FORMAT`
(:class:`photoprep.learn.dec.DEC`).

A **training checkpoint** (:data:`CHECKPOINT_FORMAT`): ``last.pt`` after every epoch (model,
optimizer, generator states, history, best so far) and ``best.pt`` when val improves.
``train.resume`` continues from ``last.pt`` only when its :func:`compat_key` (the params, but
those in :data:`RESUMABLE_CHANGES`, the classes and the train and val fingerprints) is the
current run's; a resumed run ends with the same weights as an uninterrupted one.

Every file goes through :func:`write_torch`: torch.save into a buffer, then one atomic write
(:func:`photoprep.core.io.write_bytes`).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from photoprep.core.errors import UserError
from photoprep.core.io import write_bytes
from photoprep.core.params import TrainParams
from photoprep.learn import models
from photoprep.learn.data import TrainData
from photoprep.learn.models import Architecture

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEC_FORMAT",
    "MODEL_FORMAT",
    "RESUMABLE_CHANGES",
    "Progress",
    "Resumable",
    "compat_key",
    "cpu_state",
    "load_model",
    "model_from",
    "read_checkpoint",
    "read_init_weights",
    "read_model_file",
    "restore_checkpoint",
    "save_best",
    "save_last",
    "save_model",
    "write_torch",
]

MODEL_FORMAT = "photoprep.model/1"
DEC_FORMAT = "photoprep.dec/1"
CHECKPOINT_FORMAT = "photoprep.checkpoint/1"
# Params that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume", "epochs", "early_stopping", "device", "amp")
# The stage that writes each kind of model file (named when the file is missing).
_WRITER = {MODEL_FORMAT: "train", DEC_FORMAT: "cluster"}


# --------------------------------------------------------------------------- files


def write_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically. Saved through a buffer: torch names the archive's inner folder
    after the file, so equal objects give equal bytes wherever they are written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(buffer.getvalue(), path)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the CPU (contiguous tensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_model(
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    path: str | Path,
    model_format: str = MODEL_FORMAT,
) -> None:
    """``{"format", "state_dict", "meta"}`` with torch.save, atomically. ``meta`` must be plain types."""
    write_torch({"format": model_format, "state_dict": state_dict, "meta": meta}, path)


def read_model_file(
    path: str | Path, model_format: str = MODEL_FORMAT
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and metadata of a model file of ``model_format``; anything else is a UserError."""
    path = Path(path)
    if not path.exists():
        stage = _WRITER.get(model_format, "train")
        raise UserError(f"{path} not found (run the {stage} stage first: dvc repro {stage})")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if (
        not isinstance(blob, dict)
        or blob.get("format") != model_format
        or not isinstance(blob.get("state_dict"), dict)
        or not isinstance(blob.get("meta"), dict)
    ):
        raise UserError(f"{path}: not a photoprep model file of format {model_format!r}")
    return blob["state_dict"], blob["meta"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The classifier of a model file, weights loaded, in eval mode; and its metadata."""
    state, meta = read_model_file(path, MODEL_FORMAT)
    return model_from(state, meta, device), meta


def model_from(
    state: dict[str, torch.Tensor], meta: dict[str, Any], device: str | torch.device = "cpu"
) -> nn.Module:
    """The network a model file's metadata describes, built again (no pickled code), with ``state``
    loaded, in eval mode."""
    model = models.build_model(Architecture.from_dict(meta["architecture"]))
    model.load_state_dict(state)
    return model.to(device).eval()


def read_init_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a local file for ``train.init_from``: a model file, a training checkpoint or
    a bare state dict."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"train.init_from: {path} not found (a local checkpoint; nothing is downloaded)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"train.init_from: {path} is not a checkpoint ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            state: dict[str, torch.Tensor] = blob[key]
            return state
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise UserError(f"train.init_from: {path} holds no state dict")


# --------------------------------------------------------------------------- training checkpoints


def compat_key(p: TrainParams, data: TrainData) -> str:
    """What must be equal for a checkpoint to be resumed: params (but RESUMABLE_CHANGES), classes, data."""
    settings = {k: v for k, v in p.recorded().items() if k not in RESUMABLE_CHANGES}
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
    """A training checkpoint, or None when there is none (or the file is something else)."""
    path = Path(path)
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT else None


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimiser: enough to resume exactly."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_best(path: Path, epoch: int, state: dict[str, torch.Tensor]) -> None:
    """``best.pt``: the weights of the best epoch so far."""
    write_torch({"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": state}, path)


@dataclass(frozen=True)
class Resumable:
    """What ``last.pt`` saves and restores besides the progress: the training's moving parts."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device


def save_last(path: Path, key: str, state: Resumable, progress: Progress) -> None:
    """``last.pt``: everything needed to continue after this epoch as if never stopped."""
    write_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "key": key,
            "model": cpu_state(state.model),
            "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
            "rng": _rng_state(state.generator, state.device),
            "history": progress.history,
            "best": progress.best,
            "best_model": progress.best_state,
            "since_best": progress.since_best,
            "stopped_early": progress.stopped_early,
        },
        path,
    )


def restore_checkpoint(path: Path, key: str, state: Resumable) -> Progress | None:
    """Load ``last.pt`` into the model, optimiser, scaler and generators when it exists and was
    made with the same params and data (``key``); its progress, or None to start afresh."""
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
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.generator.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if state.device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    progress = Progress(
        history=[dict(r) for r in ckpt["history"]],
        best=dict(ckpt["best"]) if ckpt.get("best") else None,
        best_state=ckpt.get("best_model"),
        since_best=int(ckpt["since_best"]),
        stopped_early=bool(ckpt["stopped_early"]),
    )
    print(f"photoprep: resuming from {path} after epoch {len(progress.history)}", file=sys.stderr)
    return progress
