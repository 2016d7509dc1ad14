"""Fingerprints (`photoprep.images.fingerprint`): hashes with a margin, crops and transforms, and the
quality, lossless, camera and colour facts the keep rule reads.
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from pictures import (
    astronaut,
    astronaut_jpeg,
    big_jpeg,
    camera,
    chelsea,
    coffee,
    encode,
)
from PIL import Image

from photoprep.images.fingerprint import hex_of_bits, mean_chroma, view_hashes
from photoprep.images.probe import ProbeSpec, fine_hashes, probe


def test_margin_leaves_out_a_caption_band_and_crop_hashes_see_a_cropped_copy():
    from PIL import ImageDraw

    picture = Image.fromarray(astronaut())
    captioned = picture.copy()
    ImageDraw.Draw(captioned).rectangle((0, 512 - 40, 512, 512), fill="white")  # 8 % band
    cropped = picture.crop((20, 20, 492, 492))  # about 4 % off each side
    whole = [probe(encode(np.asarray(im), "PNG")) for im in (picture, captioned, cropped)]
    inner = [
        probe(encode(np.asarray(im), "PNG"), ProbeSpec(margin=0.1, crops=(0.04,)))
        for im in (picture, captioned, cropped)
    ]

    def d(a: str, b: str) -> int:
        return imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b)

    assert d(whole[0]["hash"], whole[1]["hash"]) > 4  # the band moves the whole-picture hash
    assert d(inner[0]["hash"], inner[1]["hash"]) <= 2  # the margin leaves it out
    assert d(inner[0]["hash"], inner[2]["hash"]) > 4  # a crop moves the hash ...
    crop_hash = inner[0]["crop_hashes"]
    inner_spec = ProbeSpec(margin=0.1, crops=(0.04,))
    crop_fine = fine_hashes(encode(np.asarray(picture), "PNG"), inner_spec)["crop_fine_hashes"]
    assert d(crop_hash, inner[2]["hash"]) <= 2  # ... but not the original's cropped hash
    assert len(crop_hash) == 16 and len(crop_fine) == 64
    assert "," not in crop_hash and whole[0]["crop_hashes"] == ""
    with pytest.raises(ValueError, match="margin and crops"):
        ProbeSpec(margin=0.3, crops=(0.2,))


@pytest.mark.parametrize(
    ("name", "size", "hex_len"),
    [
        ("phash", 8, 16),
        ("dhash", 8, 16),
        ("ahash", 8, 16),
        ("whash", 8, 16),
        ("phash", 16, 64),
        ("whash", 16, 64),
    ],
)
def test_each_hash_kind_and_size(name, size, hex_len):
    record = probe(astronaut_jpeg(), ProbeSpec(hash_name=name, hash_size=size))
    assert record["valid"] and len(record["hash"]) == hex_len


def test_draft_hash_stays_close_to_imagehash_on_the_full_decode():
    pictures = (astronaut(), coffee(), chelsea(), camera())
    payloads = [encode(picture, "JPEG", quality=90) for picture in pictures]
    for payload in [*payloads, big_jpeg()]:  # drafts at 1/2 (512 px) and 1/8 (2048 px)
        full = imagehash.phash(Image.open(io.BytesIO(payload)))
        ours = imagehash.hex_to_hash(probe(payload)["hash"])
        assert ours - full <= 2


def test_same_picture_as_png_and_jpeg_hashes_alike():
    for picture in (astronaut(), coffee(), chelsea()):
        from_png = imagehash.hex_to_hash(probe(encode(picture, "PNG"))["hash"])
        from_jpeg = imagehash.hex_to_hash(probe(encode(picture, "JPEG", quality=90))["hash"])
        assert from_png - from_jpeg <= 2


def test_quality_lossless_camera_and_colour_are_read_from_the_file():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Nikon", "D90"
    camera_jpeg = probe(encode(coffee(), "JPEG", quality=93, exif=exif.tobytes()))
    assert (camera_jpeg["quality"], camera_jpeg["lossless"], camera_jpeg["camera"]) == (93, False, True)
    assert camera_jpeg["colour"]
    for quality in (40, 70, 85, 95, 100):
        assert probe(encode(coffee(), "JPEG", quality=quality))["quality"] == quality
    png = probe(encode(coffee(), "PNG"))
    assert (png["quality"], png["lossless"], png["camera"], png["colour"]) == (0, True, False, True)
    grey_as_rgb = np.dstack([camera()] * 3)
    for payload in (
        encode(grey_as_rgb, "JPEG", quality=90),
        encode(grey_as_rgb, "PNG"),
        encode(camera(), "PNG"),
    ):
        assert not probe(payload)["colour"]
    assert probe(encode(coffee(), "WEBP", lossless=True))["lossless"]
    assert not probe(encode(coffee(), "WEBP", quality=80))["lossless"]
    assert not probe(encode(coffee(), "TIFF", compression="jpeg"))["lossless"]
    assert probe(encode(coffee(), "TIFF", compression="tiff_lzw"))["lossless"]


def test_transform_hashes_are_the_hashes_of_the_transformed_picture():
    record = probe(encode(chelsea(), "PNG"), ProbeSpec(transforms=("hflip", "rot90", "rot180", "rot270")))
    turns = {
        "hflip": chelsea()[:, ::-1],
        "rot90": np.rot90(chelsea(), 1),
        "rot180": np.rot90(chelsea(), 2),
        "rot270": np.rot90(chelsea(), 3),
    }
    hashes = record["transform_hashes"].split(",")
    assert len(hashes) == 4
    for value, picture in zip(hashes, turns.values(), strict=True):
        assert value == probe(encode(np.ascontiguousarray(picture), "PNG"))["hash"]
    with pytest.raises(ValueError, match="transforms"):
        ProbeSpec(transforms=("shear",))


def _views() -> list[Image.Image]:
    """Grey views of every kind the probe hashes: pictures, their trims and crops, turns, flat,
    noise, tiny and thin sizes."""
    rng = np.random.default_rng(0)
    greys = [Image.fromarray(p).convert("L") for p in (astronaut(), coffee(), chelsea())]
    greys += [Image.fromarray(camera()), Image.new("L", (50, 40), 128)]
    greys += [
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((1, 1), (3, 200), (64, 64))
    ]
    views = []
    for grey in greys:
        w, h = grey.size
        views += [grey, grey.transpose(Image.Transpose.ROTATE_90)]
        views += [
            grey.crop((round(w * t), round(h * t), w - round(w * t), h - round(h * t))) for t in (0.1, 0.13)
        ]
    return views


@pytest.mark.parametrize(
    ("name", "size"),
    [("phash", 8), ("phash", 16), ("phash", 5), ("phash", 4), ("dhash", 8), ("ahash", 6), ("whash", 8)],
)
def test_view_hashes_are_imagehash_bit_for_bit(name, size):
    views = _views()
    reference = {
        "phash": imagehash.phash,
        "dhash": imagehash.dhash,
        "ahash": imagehash.average_hash,
        "whash": lambda im, hash_size: imagehash.whash(im, hash_size, image_scale=8 * hash_size),
    }[name]
    assert view_hashes(views, name, size) == [str(reference(view, hash_size=size)) for view in views]
    assert view_hashes([], name, size) == []


def test_hex_of_bits_writes_imagehash_strings():
    rng = np.random.default_rng(1)
    for n_bits in (4, 16, 25, 36, 64, 100, 256):
        bits = rng.random((20, n_bits)) < 0.5
        bits[0], bits[1] = True, False
        assert hex_of_bits(bits) == [str(imagehash.ImageHash(row)) for row in bits]


def test_mean_chroma_is_the_float32_mean_of_the_pixels_hypot():
    rng = np.random.default_rng(2)
    pictures = [astronaut(), coffee(), chelsea(), np.dstack([camera()] * 3)]
    pictures += [rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), np.full((5, 3, 3), 130, np.uint8)]
    for picture in pictures:
        ycbcr = Image.fromarray(picture).convert("YCbCr")
        pixels = np.asarray(ycbcr, dtype=np.float32)
        reference = float(np.hypot(pixels[..., 1] - 128, pixels[..., 2] - 128).mean())
        assert mean_chroma(ycbcr) == reference
    assert mean_chroma(Image.new("YCbCr", (0, 0))) == 0.0
    with pytest.raises(ValueError, match="YCbCr"):
        mean_chroma(Image.fromarray(coffee()))
