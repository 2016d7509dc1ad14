"""Provenance (`photoprep.images.provenance`): what a file's pixels say about where it came from,
on real photographs (scikit-image's samples): a JPEG history inside a lossless file, an
up-converted bit depth, and a thumbnail that an edit moves and a re-save does not."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance
from skimage import data as samples

from photoprep.core.params import ComputeParams
from photoprep.images import memo
from photoprep.images.provenance import ProvenanceSpec, jpeg_history, provenance, provenance_reader
from photoprep.ingest.store import ShardWriter

# Photographs that never went through JPEG before scikit-image shipped them.
UNTOUCHED = ("astronaut", "coffee", "camera", "immunohistochemistry")


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(samples, name)())


def _jpeg(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _sixteen_bit(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of `pixels` (uint16, RGB or grey), written by OpenCV."""
    ok, encoded = cv2.imencode(".png", pixels[..., ::-1] if pixels.ndim == 3 else pixels)
    assert ok
    return encoded.tobytes()


def _decoded(payload: bytes) -> Image.Image:
    return Image.open(io.BytesIO(payload)).convert("RGB")


@pytest.mark.parametrize("name", UNTOUCHED)
@pytest.mark.parametrize("quality", [80, 95])
def test_a_png_of_a_jpeg_shows_the_jpegs_quality_and_the_untouched_png_none(name, quality):
    photo = _photo(name)
    assert provenance(_png(photo))[0]["history"] == 0
    png_of_jpeg = _png(_decoded(_jpeg(photo, quality)).convert("RGBA"))
    assert provenance(png_of_jpeg)[0]["history"] == quality


def test_a_brightened_png_of_a_jpeg_still_shows_a_history_and_a_brightened_untouched_png_none():
    photo = _photo("coffee")
    brighter = ImageEnhance.Brightness(_decoded(_jpeg(photo, 90))).enhance(1.2)
    assert provenance(_png(brighter))[0]["history"] > 0
    assert provenance(_png(ImageEnhance.Brightness(photo).enhance(1.2)))[0]["history"] == 0


def test_sixteen_bits_up_converted_from_eight_rank_as_eight():
    rgb = np.asarray(_photo("astronaut")).astype(np.uint16)
    up, _ = provenance(_sixteen_bit(rgb * 257))
    assert (up["depth"], up["upconverted"]) == (8, True)
    rng = np.random.default_rng(0)
    genuine, _ = provenance(_sixteen_bit(rgb * 256 + rng.integers(0, 256, rgb.shape, dtype=np.uint16)))
    assert (genuine["depth"], genuine["upconverted"]) == (16, False)
    grey, _ = provenance(_sixteen_bit(np.asarray(_photo("camera")).astype(np.uint16) * 257))
    assert (grey["depth"], grey["upconverted"]) == (8, True)
    assert provenance(_png(_photo("astronaut")))[0]["depth"] == 8


def test_the_thumbnail_follows_the_picture_not_the_file():
    photo = _photo("chelsea")
    _, from_png = provenance(_png(photo))
    _, from_jpeg = provenance(_jpeg(photo, 85))
    _, brighter = provenance(_png(ImageEnhance.Brightness(photo).enhance(1.25)))
    assert from_png.shape == (32, 32) and from_png.dtype == np.uint8
    resave = np.abs(from_png.astype(int) - from_jpeg.astype(int)).mean()
    edit = np.abs(from_png.astype(int) - brighter.astype(int)).mean()
    assert resave < 1.5 and edit > 10 * resave


def test_bytes_that_do_not_decode_give_no_facts():
    facts, thumb = provenance(b"<html>not a picture</html>")
    assert facts == {"history": 0, "depth": 8, "upconverted": False}
    assert not thumb.any()


def test_jpeg_history_needs_a_lattice_at_many_frequencies():
    rng = np.random.default_rng(1)
    noise = rng.normal(128, 30, (256, 256)).clip(3, 252)
    assert jpeg_history(noise) == 0
    assert jpeg_history(np.full((4, 4), 128.0)) == 0  # smaller than a block


def test_the_reader_decodes_each_payload_once_and_memoizes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache"))
    photo = _photo("coffee")
    blobs = [_png(_decoded(_jpeg(photo, 90))), _jpeg(photo, 90), _png(photo)]
    with ShardWriter(tmp_path / "raw" / "src", 1 << 22) as writer:
        shas = [writer.add(blob) for blob in blobs]
        refs = writer.flush()
    rows = [("src", f"i{i}", refs[s].shard, refs[s].offset, refs[s].size, s) for i, s in enumerate(shas)]
    table = pd.DataFrame(rows, columns=["source", "id", "shard", "offset", "size", "sha256"])
    evidence = provenance_reader(tmp_path / "raw", ProvenanceSpec(), ComputeParams(n_jobs=1))
    first = evidence(table)
    assert list(first["history"]) == [90, 0, 0]
    assert [bytes(t) for t in first["thumb"]] == [provenance(b)[1].tobytes() for b in blobs]
    again = evidence(table.iloc[[2, 0]])
    pd.testing.assert_frame_equal(again, first.iloc[[2, 0]])
    log = [json.loads(line) for line in (memo.cache_root() / "decodes.jsonl").read_text().splitlines()]
    assert [(e["decoded"], e["cached"]) for e in log if e["stage"] == "provenance"] == [(3, 0), (0, 2)]
