"""The store's index (`photoprep.ingest.blobindex`): sha256 -> where the blob lies, in sorted
arrays and a dict of the latest, with a few dozen bytes a blob."""

from __future__ import annotations

import hashlib
import random
import tracemalloc

import numpy as np
import pytest

from photoprep.ingest import blobindex
from photoprep.ingest.blobindex import BlobIndex, BlobRef


def digests(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(n)]


def test_the_index_finds_every_blob_before_and_after_the_latest_are_merged_as_a_dict_would(monkeypatch):
    monkeypatch.setattr(blobindex, "_MERGE_AT", 16)  # merges every few adds
    index, expected = BlobIndex(), {}
    codes = [index.shard_code(f"shard-{k}.tar") for k in range(3)]
    for i, sha256 in enumerate(digests(500)):
        index.add(sha256, codes[i % 3], 512 * i, 100 + i)
        expected[sha256] = BlobRef(f"shard-{i % 3}.tar", 512 * i, 100 + i)
    assert len(index._digests) > 400  # most went through a merge into the arrays
    assert dict(index) == expected and index == expected
    for sha256 in digests(50, seed=1):
        assert sha256 not in index
        with pytest.raises(KeyError):
            index[sha256]


def test_digests_that_end_in_zero_bytes_are_told_apart(monkeypatch):
    # numpy's fixed-width byte scalars drop trailing zero bytes: the index compares arrays instead.
    monkeypatch.setattr(blobindex, "_MERGE_AT", 1)
    index = BlobIndex()
    code = index.shard_code("s.tar")
    keys = ["ab" + "00" * 31, "ab" + "00" * 30 + "01", "00" * 32, "00" * 31 + "ff"]
    for i, sha256 in enumerate(keys):
        index.add(sha256, code, i, i)
    assert [index[k].offset for k in keys] == [0, 1, 2, 3]
    assert sorted(index) == sorted(keys)
    assert "ab" + "00" * 29 + "0100" not in index


def test_the_first_place_of_a_blob_stays_and_a_shard_given_up_takes_its_blobs_with_it():
    index = BlobIndex()
    first, open_ = index.shard_code("first.tar"), index.shard_code()
    a, b, c = digests(3)
    index.add(a, first, 0, 1)
    index.add(a, open_, 9, 9)  # held already: the first place stays
    index.add(b, open_, 10, 2)
    index.add(c, open_, 20, 3)
    assert index[a] == BlobRef("first.tar", 0, 1)
    index.name(open_, "named.tar")
    assert index[b] == BlobRef("named.tar", 10, 2)
    index.forget(open_)
    assert dict(index) == {a: BlobRef("first.tar", 0, 1)}


def test_a_blob_costs_well_under_a_hundred_bytes_where_a_dict_of_refs_cost_about_270():
    keys = digests(20_000)
    tracemalloc.start()
    try:
        index = BlobIndex()
        code = index.shard_code("s.tar")
        for i, sha256 in enumerate(keys):
            index.add(sha256, code, 512 * i, 20_000 + i)
        held = tracemalloc.get_traced_memory()[0] / len(keys)
    finally:
        tracemalloc.stop()
    assert held < 100, held


def test_many_blobs_are_located_in_one_search_as_one_at_a_time_and_a_missing_one_is_named(monkeypatch):
    monkeypatch.setattr(blobindex, "_MERGE_AT", 16)
    index = BlobIndex()
    codes = [index.shard_code(f"shard-{k}.tar") for k in range(2)]
    keys = [*digests(300), "ab" + "00" * 31]
    for i, sha256 in enumerate(keys):
        index.add(sha256, codes[i % 2], 512 * i, i)
    asked = np.array(keys[::-1], "S64")
    found_codes, offsets = index.locate(asked)
    one_at_a_time = [index[k] for k in keys[::-1]]
    assert [index.names[c] for c in found_codes] == [ref.shard for ref in one_at_a_time]
    assert offsets.tolist() == [ref.offset for ref in one_at_a_time]
    assert [len(a) for a in index.locate(np.array([], "S64"))] == [0, 0]
    missing = digests(1, seed=9)[0]
    with pytest.raises(KeyError, match=missing):
        index.locate(np.array([keys[0], missing], "S64"))
