"""The probe (`photoprep.images.probe`): one decode per payload gives format, upright size, mode,
validity with a reason, and the hashes; its settings travel as one `ProbeSpec`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
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

from photoprep.core.params import ComputeParams
from photoprep.images import memo
from photoprep.images.probe import (
    FINE_FIELDS,
    PROBE_FIELDS,
    ProbeSpec,
    fine_hashes,
    fine_reader,
    probe,
    probe_many,
)
from photoprep.ingest.store import ShardWriter


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
        "transform_hashes": "",
        "crop_hashes": "",
    }
    assert len(record["hash"]) == 16 and int(record["hash"], 16) >= 0


def test_the_fine_hashes_are_of_the_views_the_probe_hashes():
    spec = ProbeSpec(margin=0.1, crops=(0.04, 0.08))
    fine = fine_hashes(astronaut_jpeg(), spec)
    assert tuple(fine) == FINE_FIELDS
    assert len(fine["fine_hash"]) == 64
    assert [len(h) for h in fine["crop_fine_hashes"].split(",")] == [64, 64]
    # The same decode and views as the probe: the picture's fine hash is the FINE_HASH of the
    # grey the probe hashes, without the margin.
    whole = fine_hashes(astronaut_jpeg())
    assert whole["crop_fine_hashes"] == "" and whole["fine_hash"] != fine["fine_hash"]
    # imagehash's 256-bit phash of the grey the probe hashes: a 400 x 600 PNG reduced by 2.
    grey = Image.fromarray(coffee()).convert("L").reduce(2)
    assert fine_hashes(encode(coffee(), "PNG"))["fine_hash"] == str(imagehash.phash(grey, hash_size=16))
    assert fine_hashes(astronaut_jpeg()[:5000]) == dict.fromkeys(FINE_FIELDS, "")


def test_the_fine_reader_decodes_each_payload_once_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache"))
    spec = ProbeSpec(margin=0.1, crops=(0.03,))
    blobs = [astronaut_jpeg(), encode(coffee(), "PNG"), encode(chelsea(), "PNG")]
    with ShardWriter(tmp_path / "raw" / "src", 1 << 22) as writer:
        shas = [writer.add(blob) for blob in blobs]
        refs = writer.flush()
    rows = [("src", f"i{i}", refs[s].shard, refs[s].offset, refs[s].size, s) for i, s in enumerate(shas)]
    table = pd.DataFrame(rows, columns=["source", "id", "shard", "offset", "size", "sha256"])
    fine = fine_reader(tmp_path / "raw", spec, ComputeParams(n_jobs=1))
    first = fine(table.iloc[[2, 0]])
    assert list(first.columns) == list(FINE_FIELDS) and list(first.index) == [2, 0]
    assert first.to_dict("records") == [fine_hashes(blobs[2], spec), fine_hashes(blobs[0], spec)]
    again = fine(table)
    pd.testing.assert_frame_equal(again.loc[[2, 0]], first)
    log = [json.loads(line) for line in (memo.cache_root() / "decodes.jsonl").read_text().splitlines()]
    assert [(e["decoded"], e["cached"]) for e in log if e["stage"] == "fine"] == [(2, 0), (1, 2)]


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
