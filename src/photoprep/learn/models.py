"""Classifiers for small images (32-96 px) and for feature vectors, built from plain arguments.

Every network is a :class:`Net`: an ordered sequence of *blocks* (the units that
``train.freeze`` counts, from the input side) ending in the classifier. A model is rebuilt
from the plain dict :func:`architecture` returns (stored in ``models/model.pt``), so a saved
model needs no pickled code: ``build_model(**meta["architecture"])`` then ``load_state_dict``.

Models
    smallcnn   two conv-BN-ReLU-maxpool blocks, then a linear layer on a 4x4 pooled grid
    convnet    ``depth`` conv-BN-activation(-maxpool) blocks, widths doubling (at most 8x),
               global average pooling, dropout, linear
    alexnet    AlexNet's five conv layers (widths 2,6,12,8,8 x ``width``) with batch norm,
               5x5 first kernel (stride 2 from 64 px), three fully connected layers
    googlenet  Inception v1: stem, inception 3a-3b, 4a-4e, 5a-5b (channels x ``width``/64),
               no auxiliary heads, three poolings so 32 px ends at 4x4
    resnet     a small CIFAR-style ResNet: stem, three stages of ``depth`` basic blocks
               (widths 1, 2, 4 x ``width``; strides 1, 2, 2), stem stride 2 from 64 px
    mlp        linear-BN-activation-dropout layers on a feature vector (HOG + Cr/Cb), or on the
               pixels (``train.input: images``: the first block flattens the 3 x H x W image)

Poolings use fixed kernels where the size divides evenly: their backward passes are
deterministic on CUDA, unlike adaptive pooling's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

ARCHITECTURES = ("smallcnn", "convnet", "alexnet", "googlenet", "resnet", "mlp")
IMAGE_MODELS = ("smallcnn", "convnet", "alexnet", "googlenet", "resnet")
DEFAULT_WIDTH = {"smallcnn": 32, "convnet": 32, "alexnet": 32, "googlenet": 32, "resnet": 16, "mlp": 512}
DEFAULT_DEPTH = {"convnet": 4, "resnet": 1, "mlp": 1}
DEFAULT_LR = {"mlp": 0.001}  # peak learning rate with AdamW; 0.01 for the others


def default_lr(name: str) -> float:
    return DEFAULT_LR.get(name, 0.01)


class Net(nn.Module):
    """A sequence of blocks; the last one is the classifier. ``freeze`` counts blocks from the input."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


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


def _pool_out(size: tuple[int, int], k: int = 3, s: int = 2, p: int = 1) -> tuple[int, int]:
    return tuple((d + 2 * p - k) // s + 1 for d in size)  # type: ignore[return-value]


# --------------------------------------------------------------------------- image models


def smallcnn(num_classes: int, input_size: tuple[int, int], width: int) -> Net:
    size = _halve(input_size, 2)
    return Net(
        [
            nn.Sequential(*_conv_bn(3, width), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn(width, 2 * width), nn.MaxPool2d(2)),
            nn.Sequential(_pool_to(4, size), _Flatten(), nn.Linear(2 * width * 16, num_classes)),
        ]
    )


def convnet(
    num_classes: int, input_size: tuple[int, int], width: int, depth: int, dropout: float, activation: str
) -> Net:
    blocks: list[nn.Module] = []
    cin, size = 3, input_size
    for i in range(depth):
        cout = width * 2 ** min(i, 3)
        layers = _conv_bn(cin, cout, act=activation)
        if min(size) >= 8:  # keep at least a 4x4 map
            layers.append(nn.MaxPool2d(2))
            size = _halve(size)
        blocks.append(nn.Sequential(*layers))
        cin = cout
    blocks.append(nn.Sequential(_GlobalAvg(), nn.Dropout(dropout), nn.Linear(cin, num_classes)))
    return Net(blocks)


def alexnet(num_classes: int, input_size: tuple[int, int], width: int, dropout: float) -> Net:
    c1, c2, c3, c4, c5 = (width * m for m in (2, 6, 12, 8, 8))
    hidden = 32 * width
    stride = 2 if min(input_size) >= 64 else 1
    size = (input_size[0] // stride, input_size[1] // stride)
    pool = nn.MaxPool2d(3, 2, 1)
    size = _pool_out(size)
    b1 = nn.Sequential(*_conv_bn(3, c1, 5, stride), pool)
    size = _pool_out(size)
    b2 = nn.Sequential(*_conv_bn(c1, c2, 5), nn.MaxPool2d(3, 2, 1))
    b3 = nn.Sequential(*_conv_bn(c2, c3))
    b4 = nn.Sequential(*_conv_bn(c3, c4))
    b5 = nn.Sequential(*_conv_bn(c4, c5), nn.MaxPool2d(3, 2, 1), _pool_to(2, _pool_out(size)), _Flatten())
    fc6 = nn.Sequential(nn.Dropout(dropout), nn.Linear(c5 * 4, hidden), nn.ReLU(inplace=True))
    fc7 = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
    fc8 = nn.Linear(hidden, num_classes)
    return Net([b1, b2, b3, b4, b5, fc6, fc7, fc8])


class Inception(nn.Module):
    """Inception v1 module: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 (the 5x5 branch) | maxpool-1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(cin, c1, 1))
        self.b3 = nn.Sequential(*_conv_bn(cin, c3r, 1), *_conv_bn(c3r, c3))
        self.b5 = nn.Sequential(*_conv_bn(cin, c5r, 1), *_conv_bn(c5r, c5), *_conv_bn(c5, c5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn(cin, pool, 1))
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


# (c1, c3r, c3, c5r, c5, pool) of GoogLeNet's inception modules, at width 64.
_INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def googlenet(num_classes: int, input_size: tuple[int, int], width: int, dropout: float) -> Net:
    def ch(c: int) -> int:
        return max(4, round(c * width / 64))

    stem_layers = [*_conv_bn(3, ch(64))]
    if min(input_size) >= 64:
        stem_layers.append(nn.MaxPool2d(2))
    stem_layers += [*_conv_bn(ch(64), ch(64), 1), *_conv_bn(ch(64), ch(192)), nn.MaxPool2d(2)]
    blocks: list[nn.Module] = [nn.Sequential(*stem_layers)]
    cin = ch(192)
    for name, spec in _INCEPTION.items():
        module = Inception(cin, *(ch(c) for c in spec))
        cin = module.out_channels
        # Downsample after 3b and 4e, as GoogLeNet does.
        blocks.append(nn.Sequential(module, nn.MaxPool2d(2)) if name in ("3b", "4e") else module)
    blocks.append(nn.Sequential(_GlobalAvg(), nn.Dropout(dropout), nn.Linear(cin, num_classes)))
    return Net(blocks)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut (1x1 conv when the shape changes); last BN starts at zero."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        nn.init.zeros_(cast(nn.BatchNorm2d, self.body[-1]).weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def resnet(num_classes: int, input_size: tuple[int, int], width: int, depth: int) -> Net:
    stride = 2 if min(input_size) >= 64 else 1
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(3, width, 3, stride))]
    cin = width
    for stage, mult in enumerate((1, 2, 4)):
        for i in range(depth):
            cout = width * mult
            blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
            cin = cout
    blocks.append(nn.Sequential(_GlobalAvg(), nn.Linear(cin, num_classes)))
    return Net(blocks)


def mlp(
    num_classes: int,
    in_features: int,
    width: int,
    depth: int,
    dropout: float,
    activation: str,
    flatten: bool = False,
) -> Net:
    """``flatten``: the input is an image (N x 3 x H x W, ``in_features`` = 3HW), flattened first."""
    blocks: list[nn.Module] = []
    cin = in_features
    for i in range(depth):
        layers: list[nn.Module] = [_Flatten()] if flatten and i == 0 else []
        layers += [
            nn.Linear(cin, width, bias=False),
            nn.BatchNorm1d(width),
            _act(activation),
            nn.Dropout(dropout),
        ]
        blocks.append(nn.Sequential(*layers))
        cin = width
    blocks.append(nn.Linear(cin, num_classes))
    return Net(blocks)


# --------------------------------------------------------------------------- building


def architecture(
    name: str,
    num_classes: int,
    input_size: Sequence[int] | None = None,
    in_features: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    dropout: float = 0.0,
    activation: str = "relu",
) -> dict[str, Any]:
    """The plain dict that :func:`build_model` takes, with the model's defaults filled in.
    An mlp given ``input_size`` reads images: its ``in_features`` is 3 x H x W."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(ARCHITECTURES)})")
    if name == "mlp" and input_size is not None:
        in_features = 3 * int(input_size[0]) * int(input_size[1])
    return {
        "name": name,
        "num_classes": int(num_classes),
        "input_size": [int(d) for d in input_size] if input_size is not None else None,
        "in_features": int(in_features) if in_features is not None else None,
        "width": int(width if width is not None else DEFAULT_WIDTH[name]),
        "depth": int(depth if depth is not None else DEFAULT_DEPTH.get(name, 1)),
        "dropout": float(dropout),
        "activation": activation,
    }


def build_model(
    name: str,
    num_classes: int,
    input_size: Sequence[int] | None = None,
    in_features: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    dropout: float = 0.0,
    activation: str = "relu",
) -> Net:
    """A fresh network; image models need ``input_size`` [H, W], the mlp needs ``in_features``."""
    a = architecture(name, num_classes, input_size, in_features, width, depth, dropout, activation)
    if name == "mlp":
        if not a["in_features"]:
            raise ValueError("the mlp needs in_features")
        flatten = a["input_size"] is not None
        return mlp(
            a["num_classes"], a["in_features"], a["width"], a["depth"], a["dropout"], activation, flatten
        )
    if a["input_size"] is None:
        raise ValueError(f"{name} needs input_size [H, W]")
    size = (a["input_size"][0], a["input_size"][1])
    if min(size) < 16:
        raise ValueError(f"{name} needs images of at least 16x16 (got {size[0]}x{size[1]})")
    k, w = a["num_classes"], a["width"]
    if name == "smallcnn":
        return smallcnn(k, size, w)
    if name == "convnet":
        return convnet(k, size, w, a["depth"], a["dropout"], activation)
    if name == "alexnet":
        return alexnet(k, size, w, a["dropout"])
    if name == "googlenet":
        return googlenet(k, size, w, a["dropout"])
    return resnet(k, size, w, a["depth"])


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def freeze_blocks(model: Net, n: int) -> int:
    """Stop gradients through the first ``n`` blocks (their batch norms keep their statistics:
    see :func:`train_mode`). Returns the number of frozen parameters."""
    blocks = list(model.blocks)
    if n >= len(blocks):
        raise ValueError(f"can freeze at most {len(blocks) - 1} blocks of this model (got {n})")
    frozen = 0
    for block in blocks[:n]:
        for p in block.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def train_mode(model: Net, frozen_blocks: int) -> None:
    """model.train(), but frozen blocks stay in eval mode so their BN running stats do not move."""
    model.train()
    for block in list(model.blocks)[:frozen_blocks]:
        block.eval()


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy the tensors of ``state`` whose name and shape match into ``model`` (transfer learning:
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
