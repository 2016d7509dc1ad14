"""The probe (`photoprep.images.probe`): one decode per payload gives format, upright size, mode,
validity with a reason, and the hashes; its settings travel as one `ProbeSpec`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pictures import (
    astronaut_jpeg,
    bilevel_bomb_png,
    chelsea,
    coffee,
    encode,
    with_orientation,
)
from PIL import Image, ImageFile

from photoprep.images.probe import PROBE_FIELDS, ProbeSpec, probe, probe_many


def test_a_good_jpeg_gives_the_full_record():
    record = probe(astronaut_jpeg())
    assert tuple(record) == PROBE_FIELDS
    assert record == {
        "format": "JPEG",
        "width": 512,
        "height": 512,
        "mode": "RGB",
        "valid": True,
        "reason": "",
        "hash": record["hash"],
        "colour": True,
        "lossless": False,
        "quality": 90,
        "camera": False,
        "fine_hash": record["fine_hash"],
        "transform_hashes": "",
        "crop_hashes": "",
        "crop_fine_hashes": "",
    }
    assert len(record["hash"]) == 16 and int(record["hash"], 16) >= 0
    assert len(record["fine_hash"]) == 64


def test_probe_is_deterministic_and_batches_agree():
    payloads = [astronaut_jpeg(), encode(coffee(), "PNG"), b"", astronaut_jpeg()[:5000]]
    first = [probe(p) for p in payloads]
    assert [probe(p) for p in payloads] == first
    assert probe_many(payloads, ProbeSpec()) == first


def test_bad_hash_parameters_are_errors_not_image_reasons():
    with pytest.raises(ValueError, match="hash_name"):
        ProbeSpec(hash_name="md5")
    with pytest.raises(ValueError, match="power-of-two"):
        ProbeSpec(hash_name="whash", hash_size=12)


def test_orientation_is_applied_before_hashing():
    stored = chelsea()
    rotated_by_tag = probe(with_orientation(stored, 8, "PNG"))
    rotated_pixels = probe(encode(np.rot90(stored, k=1), "PNG"))  # 8: 90 degrees anticlockwise
    assert (rotated_by_tag["width"], rotated_by_tag["height"]) == (300, 451)
    assert rotated_by_tag["hash"] == rotated_pixels["hash"]


def test_probe_leaves_pillow_settings_alone():
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    probe(bilevel_bomb_png(10_000, 10_000))
    probe(astronaut_jpeg()[:1000])
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
