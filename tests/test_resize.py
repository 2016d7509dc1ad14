"""Resized pixels (`photoprep.images.resize`): the fits, the shapes, and a JPEG drafted no smaller than
the pixels it fills.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pictures import (
    astronaut_jpeg,
    big_jpeg,
    coffee,
    encode,
)
from PIL import Image

from photoprep.images.resize import resized_rgb


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (120, 30)])
def test_resized_shapes(fit, size):
    for payload in (astronaut_jpeg(), encode(coffee(), "PNG")):
        pixels = resized_rgb(payload, size, fit)
        assert pixels.shape == (*size, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable


def test_stretch_is_a_plain_resize():
    payload = encode(coffee(), "PNG")
    expected = np.asarray(Image.fromarray(coffee()).resize((80, 48), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(resized_rgb(payload, (48, 80), "stretch") - expected).max() <= 2


def test_pad_keeps_aspect_with_black_bars():
    wide = resized_rgb(encode(coffee(), "PNG"), (64, 64), "pad")  # 600 x 400 -> 64 x 43
    assert (wide[:10] == 0).all() and (wide[-11:] == 0).all()
    assert (wide[10:53].reshape(-1, 3).max(axis=1) > 0).mean() > 0.99
    tall = resized_rgb(encode(np.rot90(coffee()).copy(), "PNG"), (64, 64), "pad")  # 400 x 600 -> 43 x 64
    assert (tall[:, :10] == 0).all() and (tall[:, -11:] == 0).all()
    assert (tall[:, 10:53].reshape(-1, 3).max(axis=1) > 0).mean() > 0.99
    expected = np.asarray(Image.fromarray(coffee()).resize((64, 43), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(wide[10:53].astype(int) - expected).mean() < 1


def test_crop_takes_the_centre():
    picture = coffee()  # 600 x 400 -> the centre 400 x 400 square
    pixels = resized_rgb(encode(picture, "PNG"), (64, 64), "crop").astype(int)

    def square(left: int) -> np.ndarray:
        region = Image.fromarray(picture).crop((left, 0, left + 400, 400))
        return np.asarray(region.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)

    errors = {left: np.abs(pixels - square(left)).mean() for left in (0, 50, 100, 150, 200)}
    assert errors[100] < 1 and min(errors, key=errors.get) == 100


def test_jpeg_is_resized_from_a_draft_close_to_the_full_decode():
    payload = big_jpeg()
    full = Image.open(io.BytesIO(payload)).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    assert np.abs(resized_rgb(payload, (64, 64)).astype(int) - np.asarray(full)).mean() < 3


def test_resize_arguments_are_checked():
    with pytest.raises(ValueError, match="fit"):
        resized_rgb(astronaut_jpeg(), (64, 64), "zoom")
