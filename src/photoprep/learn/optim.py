"""The fine-tuning recipe as params, built with timm's helpers: parameter groups, optimizer,
learning-rate schedule, mixup / cutmix, and which layers train when.

- **Groups** (:func:`param_groups`): timm's weight-decay groups (no decay on biases and norms),
  or its layer-wise decay groups (``train.layer_decay``: each layer group from the classifier
  down gets that share of the next one's rate, as an ``lr_scale``). Every group without the
  classifier is scaled by ``train.backbone_lr_scale`` too.
- **Optimizer** (:func:`make_optimizer`): timm's ``create_optimizer_v2`` (SGD with or without
  Nesterov, Adam, AdamW); Adam and AdamW fused (:func:`photoprep.portable.cpu_optimizer_options`).
- **Schedule** (:class:`Schedule`): timm's schedulers stepped per optimiser step from the step
  number alone, so a resumed run needs no scheduler state: ``step`` (x ``gamma`` every
  ``step_size`` epochs), ``cosine`` (to 0), ``onecycle`` (a warm-up from lr/25 over 30 % of the
  steps, then cosine down to lr/25e4), ``none``.
- **Mixup and cutmix** (:func:`make_mixup`): timm's ``Mixup`` with its soft-target loss. It draws
  from numpy's global generator; :class:`Schedule` seeds it per epoch from ``train.seed`` and puts
  the caller's state back, so an epoch's mixing is the same whether or not the run was resumed.
- **Phases** (:func:`trainable`): ``train.head_epochs`` epochs with the classifier alone, the
  rest frozen (batch norms keep their statistics), then every layer but those ``train.freeze``
  keeps frozen for the whole run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from photoprep import portable
from photoprep.core.params import TrainParams
from photoprep.learn import models
from photoprep.learn.backbones import timm_module

__all__ = [
    "Schedule",
    "make_mixup",
    "make_optimizer",
    "param_groups",
    "peak_lr",
    "trainable",
]


def peak_lr(p: TrainParams) -> float:
    """``train.lr``, or the model's default when it is null."""
    return p.lr if p.lr is not None else models.default_lr(p.model, p.pretrained is not None)


def _head_names(model: nn.Module) -> set[str]:
    head = {id(t) for t in models.classifier_of(model).parameters()}
    return {name for name, t in model.named_parameters() if id(t) in head}


def param_groups(model: nn.Module, p: TrainParams) -> list[dict[str, Any]]:
    """timm's parameter groups for ``p`` (weight decay, layer decay), each split into classifier
    and the rest; the rest's ``lr_scale`` multiplied by ``train.backbone_lr_scale``."""
    timm_module()
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if p.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=p.weight_decay, layer_decay=p.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=p.weight_decay)
    head = {id(t) for t in models.classifier_of(model).parameters()}
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        for in_head in (True, False):
            mine = [t for t in params if (id(t) in head) == in_head]
            if not mine:
                continue
            scale = float(group.get("lr_scale", 1.0)) * (1.0 if in_head else p.backbone_lr_scale)
            rest = {k: v for k, v in group.items() if k not in ("params", "lr_scale", "param_names")}
            out.append({**rest, "params": mine, "lr_scale": scale})
    return out


def make_optimizer(model: nn.Module, p: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer of ``train.optimizer`` over :func:`param_groups`."""
    timm_module()
    from timm.optim import create_optimizer_v2

    if p.optimizer == "sgd":
        name, extra = ("sgd" if p.nesterov and p.momentum > 0 else "momentum"), {}
    else:
        name, extra = p.optimizer, portable.cpu_optimizer_options(device.type)
    optimizer = create_optimizer_v2(
        param_groups(model, p),
        opt=name,
        lr=peak_lr(p),
        weight_decay=p.weight_decay,
        momentum=p.momentum,
        **extra,
    )
    return optimizer


@dataclass
class Schedule:
    """The learning rate of every step (timm's schedulers; see the module notes) and the seeded
    numpy generator that mixup draws from in each epoch."""

    p: TrainParams
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int

    def __post_init__(self) -> None:
        self.total = self.steps_per_epoch * self.p.epochs
        self.scheduler = self._scheduler()

    def _scheduler(self) -> Any:
        timm_module()
        from timm.scheduler import CosineLRScheduler, StepLRScheduler

        p, lr, opt = self.p, peak_lr(self.p), self.optimizer
        if p.schedule == "step":
            decay = p.step_size * max(self.steps_per_epoch, 1)
            return StepLRScheduler(opt, decay_t=decay, decay_rate=p.gamma, t_in_epochs=False)
        if p.schedule == "cosine":
            return CosineLRScheduler(opt, t_initial=max(self.total, 1), lr_min=0.0, t_in_epochs=False)
        if p.schedule == "onecycle":
            warm = max(1, int(0.3 * self.total))
            return CosineLRScheduler(
                opt,
                t_initial=max(self.total - warm, 1),
                lr_min=lr / 25e4,
                warmup_t=warm,
                warmup_lr_init=lr / 25,
                warmup_prefix=True,
                t_in_epochs=False,
            )
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return None

    def at(self, step: int) -> float:
        """Set every group's rate for optimiser step ``step``; return the classifier's (unscaled) rate."""
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=step)
        group = self.optimizer.param_groups[0]
        return float(group["lr"]) / float(group.get("lr_scale", 1.0))

    @contextlib.contextmanager
    def mixing(self, epoch: int) -> Iterator[None]:
        """numpy's global generator seeded for ``epoch`` (mixup draws from it), then restored."""
        state = np.random.get_state()
        np.random.seed((self.p.seed * 1_000_003 + epoch) % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


def make_mixup(p: TrainParams, num_classes: int) -> tuple[Any, nn.Module] | None:
    """timm's ``Mixup`` for ``train.mixup`` / ``train.cutmix`` (label smoothing folded in) and the
    soft-target cross-entropy its targets need; None when both are off."""
    if not (p.mixup or p.cutmix):
        return None
    timm_module()
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixup = Mixup(
        mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, label_smoothing=p.label_smoothing, num_classes=num_classes
    )
    return mixup, SoftTargetCrossEntropy()


def trainable(model: nn.Module, p: TrainParams, epoch: int, frozen: set[str]) -> None:
    """Which parameters train in ``epoch``: the classifier alone during the first
    ``train.head_epochs``, then all but ``frozen`` (``train.freeze``'s layer groups)."""
    head_only = epoch < p.head_epochs
    head = _head_names(model) if head_only else set()
    for name, t in model.named_parameters():
        t.requires_grad_(name in head if head_only else name not in frozen)
