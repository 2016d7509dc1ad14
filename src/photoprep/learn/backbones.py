"""timm backbones by name: ``train.model: timm/<architecture>``.

timm builds the network (any of its architectures, with the dataset's number of classes), knows
each one's pretrained configurations (input size, mean, std, interpolation, where the weights
lie on the hub) and loads weights into it, dropping a classifier of another size and adapting
what its filters expect. This module only names what photoprep asks of it:

- :func:`timm_module`: timm, imported once (see below for torchvision);
- :func:`create` a timm model from an :class:`~photoprep.learn.models.Architecture`, optionally
  with a state dict loaded the way timm loads pretrained weights (strictly, but for the head);
- :func:`data_config`: what the pretrained weights expect of their input;
- :func:`stage_groups`: the parameter names per layer group (stem, stages, head), for
  ``train.freeze`` and layer-wise decay.

torchvision without its compiled operators
    timm imports torchvision. PyPI's torchvision wheels are built against the CUDA build of torch;
    beside torch's CPU wheel their compiled operators (``nms``, ``roi_align``, ...) cannot load.
    torchvision is written to import without them (each meta registration checks that they
    loaded) except for two, ``nms`` and ``qnms``, whose registrations fail with "operator
    torchvision::nms does not exist". :func:`timm_module` first imports timm as is; only when
    that fails this way does it declare those two operators' schemas (no kernel: calling them
    still fails) and import again. Classification never calls them. With a matching torchvision
    (a CPU build from download.pytorch.org, or CUDA torch) nothing is declared.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from photoprep.learn.models import Architecture

__all__ = ["create", "data_config", "pretrained_cfg", "stage_groups", "timm_module", "timm_name"]

_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[Any] = []  # the torch.library.Library holding the schemas, kept alive


def timm_module() -> ModuleType:
    """timm, importable beside torch's CPU wheel (see the module notes)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        for schema in _UNGUARDED_OPS:
            library.define(schema)
        _declared.append(library)
        import timm
    return timm


def timm_name(model: str) -> str:
    """``timm/resnet18`` -> ``resnet18``."""
    return model.removeprefix("timm/")


def pretrained_cfg(name: str) -> dict[str, Any] | None:
    """timm's pretrained configuration of ``name`` (``resnet18`` or ``resnet18.a1_in1k``: its default
    tag or that one), as a plain dict; None when timm has no such architecture or tag."""
    timm = timm_module()
    arch = name.split(".", 1)[0]
    if arch not in timm.list_models():
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # "Invalid pretrained tag"
        return None
    return None if cfg is None else dict(cfg.to_dict())


def check_architecture(model: str) -> None:
    """A UserError naming the closest names when timm has no architecture ``model``."""
    import difflib

    from photoprep.core.errors import UserError

    timm = timm_module()
    name = timm_name(model)
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join('timm/' + c for c in close)}?)" if close else ""
        raise UserError(f"train.model: timm has no architecture {name!r}{hint}")


def create(arch: Architecture, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The timm model of ``arch`` (``num_classes`` 0: no classifier, its output is the pooled
    features). With ``state_dict``, timm loads it as pretrained weights: every tensor must fit
    but the classifier's, which stays fresh when the number of classes differs."""
    timm = timm_module()
    kwargs: dict[str, Any] = {"num_classes": arch.num_classes, "drop_rate": arch.dropout}
    if arch.drop_path:
        kwargs["drop_path_rate"] = arch.drop_path
    name = timm_name(arch.name)
    if state_dict is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)}, **kwargs
    )


def data_config(name: str) -> dict[str, Any]:
    """What the pretrained weights ``name`` (``resnet18``: its default tag, or ``resnet18.a1_in1k``)
    expect of their input, from timm's pretrained config: input size [H, W], mean, std and
    interpolation (ImageNet's 224 px, mean, std and bilinear where timm has no config)."""
    timm = timm_module()
    cfg = pretrained_cfg(name) or {}
    resolved = timm.data.resolve_data_config({}, pretrained_cfg=cfg) if cfg else {}
    size = resolved.get("input_size", (3, 224, 224))
    return {
        "input_size": [int(size[1]), int(size[2])],
        "mean": [float(v) for v in resolved.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)],
        "std": [float(v) for v in resolved.get("std", timm.data.IMAGENET_DEFAULT_STD)],
        "interpolation": str(resolved.get("interpolation") or "bilinear"),
        "normalize": "pretrained",  # by this mean and std (weights photoprep saved may say "image")
    }


def stage_groups(model: nn.Module) -> list[list[str]]:
    """The model's parameter names by layer group, input side first (timm's coarse grouping:
    stem, each stage, the head), as ``train.freeze`` counts them."""
    timm = timm_module()
    matcher = model.group_matcher(coarse=True)  # type: ignore[operator]
    grouped = timm.models.group_parameters(model, matcher)
    return [list(names) for _, names in sorted(grouped.items())]
