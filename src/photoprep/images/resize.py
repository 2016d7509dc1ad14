"""Pixels of one size: an image decoded (guarded, upright RGB) and resized to (H, W) by a fit.

A JPEG is decoded by libjpeg at the smallest draft scale that keeps the picture at least as
large as the pixels it will fill, so a 12-megapixel photo resized to 64 x 64 costs a 1/8 decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from photoprep.core.params import Params
from photoprep.images.decode import NO_BUDGET, DecodeLimits, upright_rgb
from photoprep.images.formats import codec_versions

FITS = ("stretch", "pad", "crop")
RESAMPLE = Image.Resampling.LANCZOS
"""Resampling of `resized_rgb`. With `REDUCING_GAP` Pillow first box-reduces by an integer
factor and runs Lanczos on the rest, which its docs call indistinguishable from fair
resampling; after a JPEG draft the remaining factor is below 2, so Lanczos costs little."""


REDUCING_GAP = 3.0


@dataclass(frozen=True)
class PixelSpec:
    """What a resize needs to know: the output size (H, W), the fit, and the decode's limits."""

    size: tuple[int, int]
    fit: str = "stretch"
    limits: DecodeLimits = NO_BUDGET

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS} (got {self.fit!r})")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be positive (got {self.size!r})")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @classmethod
    def from_params(cls, p: Params) -> PixelSpec:
        """The bucket stage's pixels, decoded under `DecodeLimits.after_probe`."""
        height, width = p.bucket.size
        return cls((height, width), p.bucket.fit, DecodeLimits.after_probe(p))

    def settings(self) -> dict[str, Any]:
        """Everything the pixels depend on besides the bytes: the memo's key."""
        return {
            "size": list(self.size),
            "fit": self.fit,
            "max_pixels": self.limits.max_pixels,
            "codecs": codec_versions(),
        }


def resized_rgb(
    data: bytes,
    size: tuple[int, int],
    fit: str = "stretch",
    limits: DecodeLimits = NO_BUDGET,
) -> np.ndarray:
    """uint8 array of shape (H, W, 3) for size=(H, W), or raise ImageRejected.

    fit: "stretch" resizes to (H, W) ignoring aspect; "pad" keeps aspect, fits inside and
    centres the picture on black; "crop" keeps aspect, fills and cuts the centre.
    Resampling: `RESAMPLE` with `REDUCING_GAP`. A JPEG is decoded at the smallest scale that
    keeps the picture at least as large as the pixels it will fill.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS} (got {fit!r})")
    out = (int(size[1]), int(size[0]))
    if min(out) < 1:
        raise ValueError(f"size must be positive (got {size!r})")
    rgb = upright_rgb(data, limits, lambda upright: _fill_size(upright, out, fit))
    return np.array(_fit(rgb, out, fit), dtype=np.uint8)


def _fill_size(size: tuple[int, int], out: tuple[int, int], fit: str) -> tuple[int, int]:
    """Size (width, height) the whole picture takes once scaled for `fit` into `out`."""
    width, height = size
    if fit == "stretch":
        return out
    ratios = (out[0] / width, out[1] / height)
    ratio = min(ratios) if fit == "pad" else max(ratios)
    return max(1, math.ceil(width * ratio)), max(1, math.ceil(height * ratio))


def _fit(im: Image.Image, out: tuple[int, int], fit: str) -> Image.Image:
    out_w, out_h = out
    width, height = im.size
    if fit == "stretch":
        return im.resize(out, RESAMPLE, reducing_gap=REDUCING_GAP)
    if fit == "crop":
        ratio = max(out_w / width, out_h / height)
        crop_w, crop_h = out_w / ratio, out_h / ratio
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        return im.resize(out, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    ratio = min(out_w / width, out_h / height)
    inner = (
        min(out_w, max(1, round(width * ratio))),
        min(out_h, max(1, round(height * ratio))),
    )
    canvas = Image.new("RGB", out, (0, 0, 0))
    canvas.paste(
        im.resize(inner, RESAMPLE, reducing_gap=REDUCING_GAP),
        ((out_w - inner[0]) // 2, (out_h - inner[1]) // 2),
    )
    return canvas
