"""Classifiers: timm backbones by name, and the few small networks no library has.

``train.model: timm/<architecture>`` builds any of timm's models (:mod:`photoprep.learn.backbones`):
ResNets, MobileNets, EfficientNets, Inception-ResNet, ViTs, with their pretrained weights. The
hand-written AlexNet, GoogLeNet and ResNet of earlier versions are gone: timm has them, and
better. Kept here, because no library has them:

    smallcnn   two conv-BN-ReLU-maxpool blocks, then a linear layer on a 4x4 pooled grid: the
               fastest baseline for 32-64 px images
    convnet    ``depth`` conv-BN-activation(-maxpool) blocks, widths doubling (at most 8x),
               global average pooling, dropout, linear: the demo's model, with the sigmoid
               activation the seeds' studies compare
    mlp        linear-BN-activation-dropout layers on a feature vector (HOG + Cr/Cb), or on the
               pixels (``train.input: images``): the ANN of the studies, on hand-made features

timm's networks are built for 224 px photographs; on 32-64 px images their stems throw away
most of the picture, which is why the small ones stay. Poolings use fixed kernels where the
size divides evenly: their backward passes are deterministic on CUDA, unlike adaptive pooling's.

Every network is described by an :class:`Architecture`, stored in ``models/model.pt`` as a plain
dict, so a saved model needs no pickled code: ``build_model(Architecture.from_dict(meta))``
then ``load_state_dict``. Small networks are a :class:`Net` of *blocks* (the units
``train.freeze`` counts); they answer timm's ``group_matcher`` and ``get_classifier`` too, so
freezing, head-only training and layer-wise decay treat both kinds alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "SMALL_MODELS",
    "Architecture",
    "Net",
    "build_model",
    "classifier_of",
    "count_parameters",
    "default_lr",
    "frozen_names",
    "layer_groups",
    "load_matching",
    "train_mode",
]

SMALL_MODELS = ("smallcnn", "convnet", "mlp")
DEFAULT_WIDTH = {"smallcnn": 32, "convnet": 32, "mlp": 512}
DEFAULT_DEPTH = {"convnet": 4, "mlp": 1}


def default_lr(name: str, pretrained: bool = False) -> float:
    """The peak learning rate when ``train.lr`` is null: 0.01 for the small conv nets, 0.001 for the
    mlp and timm models from scratch, 0.0003 for a timm model fine-tuned from pretrained weights (a
    higher rate spends what they know: on the demo, 0.001 lost 0.01 to 0.03 of test accuracy)."""
    if name.startswith("timm/"):
        return 0.0003 if pretrained else 0.001
    return 0.001 if name == "mlp" else 0.01


@dataclass(frozen=True)
class Architecture:
    """What a network is, in plain values: enough to build it again.

    ``input_size`` [H, W] for image models; ``in_features`` for the mlp (3 x H x W when it reads
    pixels); ``width`` and ``depth`` for the small nets (filled with their defaults by
    :meth:`of`); ``drop_path`` for timm models. ``num_classes`` 0: a timm backbone without a
    classifier, whose output is its pooled features.
    """

    name: str
    num_classes: int
    input_size: tuple[int, int] | None = None
    in_features: int | None = None
    width: int | None = None
    depth: int | None = None
    dropout: float = 0.0
    activation: str = "relu"
    drop_path: float = 0.0

    @property
    def is_timm(self) -> bool:
        return self.name.startswith("timm/")

    @classmethod
    def of(
        cls,
        name: str,
        num_classes: int,
        input_size: Sequence[int] | None = None,
        in_features: int | None = None,
        **settings: Any,
    ) -> Architecture:
        """An architecture with the small nets' defaults filled in. An mlp given ``input_size``
        reads images: its ``in_features`` is 3 x H x W."""
        if name not in SMALL_MODELS and not name.startswith("timm/"):
            raise ValueError(f"unknown model {name!r} (one of {', '.join(SMALL_MODELS)} or timm/<name>)")
        if name == "mlp" and input_size is not None:
            in_features = 3 * int(input_size[0]) * int(input_size[1])
        small = name in SMALL_MODELS
        width, depth = settings.pop("width", None), settings.pop("depth", None)
        return cls(
            name=name,
            num_classes=int(num_classes),
            input_size=(int(input_size[0]), int(input_size[1])) if input_size is not None else None,
            in_features=int(in_features) if in_features is not None else None,
            width=int(width if width is not None else DEFAULT_WIDTH[name]) if small else None,
            depth=int(depth if depth is not None else DEFAULT_DEPTH.get(name, 1)) if small else None,
            **settings,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples): what ``models/model.pt`` stores."""
        out = asdict(self)
        out["input_size"] = list(self.input_size) if self.input_size is not None else None
        if not self.is_timm:
            out.pop("drop_path")
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Architecture:
        size = record.get("input_size")
        known = {
            k: record[k] for k in ("in_features", "width", "depth", "dropout", "activation") if k in record
        }
        return cls(
            name=str(record["name"]),
            num_classes=int(record["num_classes"]),
            input_size=(int(size[0]), int(size[1])) if size is not None else None,
            drop_path=float(record.get("drop_path", 0.0)),
            **known,
        )


class Net(nn.Module):
    """A sequence of blocks; the last one holds the classifier. ``freeze`` counts blocks from the input."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping: one group per block (used by freezing and layer-wise decay)."""
        return {"blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        """The last linear layer, as timm models name theirs."""
        return [m for m in self.modules() if isinstance(m, nn.Linear)][-1]


# --------------------------------------------------------------------------- pieces


def _act(name: str) -> nn.Module:
    return nn.Sigmoid() if name == "sigmoid" else nn.ReLU(inplace=True)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act: str = "relu") -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), _act(act)]


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class _GlobalAvg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def _pool_to(grid: int, size: tuple[int, int]) -> nn.Module:
    """Average pooling of an H x W map down to grid x grid (fixed kernel when it divides)."""
    h, w = size
    if h % grid == 0 and w % grid == 0:
        return nn.AvgPool2d((h // grid, w // grid))
    return nn.AdaptiveAvgPool2d(grid)


def _halve(size: tuple[int, int], times: int = 1) -> tuple[int, int]:
    h, w = size
    for _ in range(times):
        h, w = h // 2, w // 2
    return h, w


# --------------------------------------------------------------------------- small models


def smallcnn(a: Architecture) -> Net:
    assert a.input_size is not None and a.width is not None
    width, size = a.width, _halve(a.input_size, 2)
    return Net(
        [
            nn.Sequential(*_conv_bn(3, width), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn(width, 2 * width), nn.MaxPool2d(2)),
            nn.Sequential(_pool_to(4, size), _Flatten(), nn.Linear(2 * width * 16, a.num_classes)),
        ]
    )


def convnet(a: Architecture) -> Net:
    assert a.input_size is not None and a.width is not None and a.depth is not None
    blocks: list[nn.Module] = []
    cin, size = 3, a.input_size
    for i in range(a.depth):
        cout = a.width * 2 ** min(i, 3)
        layers = _conv_bn(cin, cout, act=a.activation)
        if min(size) >= 8:  # keep at least a 4x4 map
            layers.append(nn.MaxPool2d(2))
            size = _halve(size)
        blocks.append(nn.Sequential(*layers))
        cin = cout
    blocks.append(nn.Sequential(_GlobalAvg(), nn.Dropout(a.dropout), nn.Linear(cin, a.num_classes)))
    return Net(blocks)


def mlp(a: Architecture) -> Net:
    """On a feature vector, or on an image (``input_size`` set): the first block flattens it."""
    assert a.in_features is not None and a.width is not None and a.depth is not None
    blocks: list[nn.Module] = []
    cin = a.in_features
    for i in range(a.depth):
        layers: list[nn.Module] = [_Flatten()] if a.input_size is not None and i == 0 else []
        layers += [
            nn.Linear(cin, a.width, bias=False),
            nn.BatchNorm1d(a.width),
            _act(a.activation),
            nn.Dropout(a.dropout),
        ]
        blocks.append(nn.Sequential(*layers))
        cin = a.width
    blocks.append(nn.Linear(cin, a.num_classes))
    return Net(blocks)


# --------------------------------------------------------------------------- building


def build_model(a: Architecture, pretrained: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A fresh network; with ``pretrained`` (timm models), timm loads those weights into it.
    Image models need ``input_size`` [H, W], the mlp needs ``in_features``."""
    if a.is_timm:
        from photoprep.learn import backbones

        return backbones.create(a, pretrained)
    if a.name == "mlp":
        if not a.in_features:
            raise ValueError("the mlp needs in_features")
        return mlp(a)
    if a.input_size is None:
        raise ValueError(f"{a.name} needs input_size [H, W]")
    if min(a.input_size) < 16:
        raise ValueError(f"{a.name} needs images of at least 16x16 (got {a.input_size[0]}x{a.input_size[1]})")
    return smallcnn(a) if a.name == "smallcnn" else convnet(a)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier layer: timm's ``get_classifier`` (small nets answer it too), else the last
    linear layer."""
    if hasattr(model, "get_classifier"):
        head: nn.Module = model.get_classifier()  # type: ignore[operator]
        return head
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, input side first: a small net's blocks, a timm model's
    stem, stages and head."""
    from photoprep.learn import backbones

    return backbones.stage_groups(model)


def frozen_names(model: nn.Module, n: int) -> set[str]:
    """The parameter names of the first ``n`` layer groups (``train.freeze``)."""
    groups = layer_groups(model)
    if n >= len(groups):
        raise ValueError(f"can freeze at most {len(groups) - 1} layer groups of this model (got {n})")
    return {name for group in groups[:n] for name in group}


def train_mode(model: nn.Module) -> None:
    """model.train(), but batch norms whose parameters are all frozen stay in eval mode, so their
    running statistics do not move (a frozen block, or the backbone while the head trains alone)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of ``state`` whose name and shape match into ``model`` (``train.init_from``:
    a different number of classes leaves the classifier fresh). Returns (loaded, skipped) names."""
    own = model.state_dict()
    loaded, skipped = [], []
    for name, tensor in state.items():
        if name in own and own[name].shape == tensor.shape:
            own[name] = tensor.to(own[name].dtype)
            loaded.append(name)
        else:
            skipped.append(name)
    model.load_state_dict(own)
    return loaded, skipped
