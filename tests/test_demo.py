"""The embedded demo source: real digits, the real collection's defects, hashes kept apart."""

import hashlib
import json
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photoprep import demo
from photoprep.core.params import DedupParams
from photoprep.images import hamming
from photoprep.images.probe import ProbeSpec, probe
from photoprep.ingest import manifest, sources

DEMO = Path(__file__).resolve().parents[1] / "pipeline" / "sources" / "demo"
EXPECTED = json.loads((DEMO / "expected.json").read_text())


def _bytes(rid: str) -> bytes:
    return (DEMO / "cdn" / rid).read_bytes()


def _distance(a: bytes, b: bytes) -> int:
    packed = hamming.pack_hashes([probe(a)["hash"], probe(b)["hash"]])
    return int(np.unpackbits(packed[0] ^ packed[1]).sum())


def test_every_id_is_listed_in_vie_and_fra_and_the_reader_merges_them():
    listed = manifest.read_manifest(sources.load_source("demo", DEMO.parent))
    assert len(listed.records) == EXPECTED["unique_ids"]
    assert len(listed.malformed) == EXPECTED["malformed_lines"]
    assert listed.lines_read == EXPECTED["lines"]
    titles = listed.records["titles"].map(json.loads)
    assert all(set(t) == {"vie", "fra"} for t in titles)
    assert any("Chữ số" in t["vie"] for t in titles)
    assert (DEMO / "photos.txt").read_bytes().startswith(b"\xef\xbb\xbf")


def test_labels_cover_every_image_and_copies_share_their_original_label():
    labels = sources.load_labels(sources.load_source("demo", DEMO.parent)).set_index("id")["label"]
    files = {p.name for p in (DEMO / "cdn").iterdir()}
    assert files <= set(labels.index)
    assert set(labels) == {str(d) for d in range(10)}
    for kind in ("exact", "near"):
        for copy, original in EXPECTED["ids"][kind].items():
            assert labels[copy] == labels[original]


def test_exact_copies_are_byte_identical_and_near_copies_are_not():
    for copy, original in EXPECTED["ids"]["exact"].items():
        assert _bytes(copy) == _bytes(original)
    for copy, original in EXPECTED["ids"]["near"].items():
        assert _bytes(copy) != _bytes(original)
        assert _distance(_bytes(copy), _bytes(original)) <= 3
    assert len(EXPECTED["ids"]["exact"]) == 30 and len(EXPECTED["ids"]["near"]) == 20


def test_broken_payloads_are_broken_as_stated():
    reasons = Counter()
    for rid, reason in EXPECTED["ids"]["broken"].items():
        verdict = probe(_bytes(rid))
        if reason == "too_small":
            assert verdict["valid"] and min(verdict["width"], verdict["height"]) < 32
        else:
            assert verdict["reason"] == reason, rid
        reasons[reason] += 1
    assert dict(reasons) == EXPECTED["broken"]
    for rid in EXPECTED["ids"]["missing"]:
        assert not (DEMO / "cdn" / rid).exists()


def test_distinct_digits_stay_far_apart_under_phash():
    copies = set(EXPECTED["ids"]["exact"]) | set(EXPECTED["ids"]["near"]) | set(EXPECTED["ids"]["broken"])
    distinct = sorted(p.name for p in (DEMO / "cdn").iterdir() if p.name not in copies)
    assert len(distinct) == EXPECTED["digits"]
    packed = hamming.pack_hashes([probe(_bytes(rid))["hash"] for rid in distinct])
    assert len(hamming.near_duplicate_pairs(packed, 9).pairs) == 0
    assert EXPECTED["min_distinct_phash_distance"] >= 10


def test_distinct_digits_stay_apart_at_the_default_dedup_params():
    p = DedupParams()
    copies = set(EXPECTED["ids"]["exact"]) | set(EXPECTED["ids"]["near"]) | set(EXPECTED["ids"]["broken"])
    distinct = sorted(f.name for f in (DEMO / "cdn").iterdir() if f.name not in copies)
    records = [probe(_bytes(rid), ProbeSpec.from_dedup(p)) for rid in distinct]
    hashes = hamming.pack_hashes([r["hash"] for r in records])
    assert len(hamming.near_duplicate_pairs(hashes, 5).pairs) == 0  # 6 bits apart at least
    cropped = [r["crop_hashes"].split(",") for r in records]
    others = hamming.pack_hashes([c[j] for j in range(len(p.crops)) for c in cropped])
    found = hamming.near_duplicate_pairs(hashes, p.near_threshold, others)
    owner = np.tile(np.arange(len(distinct)), len(p.crops))
    close = {
        (distinct[a], distinct[b])
        for u, w, _ in found.across
        for a in np.flatnonzero(found.inverse == u)
        for b in owner[np.flatnonzero(found.other_inverse == w)]
        if a != b
    }
    # One pair of different 3s; tests/test_dedup.py shows the fine-hash check refusing it.
    assert close == {("3578ba50-f885-59d3-a609-35cad0ae8083", "2ec30a31-43f7-522d-b292-c34efdb62e60")}


def test_images_are_real_digits_at_mixed_resolutions():
    sizes = Counter()
    for p in sorted((DEMO / "cdn").iterdir())[:300]:
        try:
            sizes[Image.open(BytesIO(p.read_bytes())).size] += 1
        except OSError:
            continue
    assert sizes[(64, 64)] > 50 and sizes[(96, 96)] > 50
    assert any(w == 200 and 120 <= h <= 165 for w, h in sizes)


@pytest.mark.slow
def test_rendering_is_deterministic(tmp_path):
    one = demo.render_demo(tmp_path / "a", limit=60)
    two = demo.render_demo(tmp_path / "b", limit=60)
    assert one == two

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
