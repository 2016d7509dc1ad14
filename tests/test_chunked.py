"""Chunked arrays (photoprep.core.chunked): where chunks end depends on the rows near them, so an
increment adds chunks and rewrites at most one; the folder reads like a memory-mapped .npy; a
memo part and an output chunk are one file; and a bad folder is one clear error."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pandas as pd
import pytest
from mounts import tmpfs

from photoprep.core import chunked
from photoprep.core.errors import UserError
from photoprep.images import memo


def _keys(ids: range | list[int]) -> list[str]:
    return [hashlib.sha256(f"photo-{i}".encode()).hexdigest() for i in ids]


def _chunks(keys: list[str], groups: list[str] | None = None, target: int = 16) -> list[tuple[str, ...]]:
    return [tuple(keys[a:b]) for a, b in chunked.boundaries(keys, groups, target)]


def test_boundaries_cover_every_row_once_and_average_the_target():
    keys = _keys(range(20_000))
    cuts = chunked.boundaries(keys, None, 64)
    assert cuts[0][0] == 0 and cuts[-1][1] == len(keys)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cuts))
    sizes = np.diff([a for a, _ in cuts] + [len(keys)])
    assert sizes.max() <= 4 * 64
    assert 40 < sizes.mean() < 90  # geometric around the target, capped at four times it


def test_appending_rows_keeps_every_chunk_but_the_last():
    before = _chunks(_keys(range(2000)))
    after = _chunks(_keys(range(2020)))
    kept = set(before) & set(after)
    assert len(kept) >= len(before) - 1
    assert sum(map(len, set(after) - kept)) <= 4 * 16 + 20


def test_inserting_or_removing_a_row_rewrites_one_chunk():
    keys = _keys(range(3000))
    before = set(_chunks(keys))
    inserted = set(_chunks(keys[:1500] + _keys([99_999]) + keys[1500:]))
    removed = set(_chunks(keys[:700] + keys[701:]))
    assert len(before - inserted) <= 2 and len(before - removed) <= 2  # a cap may move one more
    assert len(inserted - before) <= 2 and len(removed - before) <= 2


def test_a_new_group_never_touches_the_chunks_of_another():
    keys = _keys(range(1000))
    groups = ["b"] * 1000
    before = set(_chunks(keys, groups))
    new = _keys(range(5000, 5100))
    after = set(_chunks(new + keys, ["a"] * 100 + groups))
    assert before <= after


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (500, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "images"
    chunked.save(path, array, target=32)
    return path, array


def test_the_folder_reads_like_the_array(folder):
    path, array = folder
    rows = chunked.ChunkedArray(path)
    assert (len(rows), rows.shape, rows.dtype, rows.ndim) == (500, array.shape, array.dtype, 4)
    assert rows.chunks > 1 and rows.nbytes == array.nbytes
    np.testing.assert_array_equal(np.asarray(rows), array)
    np.testing.assert_array_equal(rows[7], array[7])
    np.testing.assert_array_equal(rows[-1], array[-1])
    np.testing.assert_array_equal(rows[10:400:7], array[10:400:7])
    picks = np.array([499, 0, 250, 250, 3])
    np.testing.assert_array_equal(rows[picks], array[picks])
    np.testing.assert_array_equal(rows[[5, 1], :, 0], array[[5, 1], :, 0])
    np.testing.assert_array_equal(rows[array[:, 0, 0, 0] > 128], array[array[:, 0, 0, 0] > 128])
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in rows.blocks()]), array)
    with pytest.raises(IndexError):
        rows[500]
    with pytest.raises(IndexError):
        rows.take(np.array([0, 500]))


def test_writing_the_same_rows_again_gives_the_same_files_and_leaves_no_temporary(folder, tmp_path):
    path, array = folder
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    chunked.save(path, array, target=32)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    index = json.loads((path / chunked.INDEX).read_text())
    assert index["shape"] == list(array.shape) and sum(r for _, r in index["chunks"]) == 500


def test_a_missing_index_or_a_chunk_that_disagrees_with_it_is_one_clear_error(folder, tmp_path):
    path, _ = folder
    with pytest.raises(UserError, match=r"no index\.json"):
        chunked.ChunkedArray(tmp_path / "elsewhere")
    first = json.loads((path / chunked.INDEX).read_text())["chunks"][0][0]
    np.save(path / first, np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="dvc checkout"):
        chunked.ChunkedArray(path)[0]


def _by_rows(rows: list[str], compute):
    """`compute` (which takes batches of keys) as `Memo.fill_chunks` calls it: with batches of
    positions, here in `rows`, since the chunks are its slices."""

    def by_rows(groups):
        return compute([[rows[position] for position in group.tolist()] for group in groups])

    return by_rows


def test_memo_parts_are_the_output_chunks_one_file_and_only_missing_keys_are_computed(tmp_path):
    keys = _keys(range(300))
    values = {k: np.full((2, 2), i, np.int32) for i, k in enumerate(keys)}
    computed: list[str] = []

    def compute(groups):
        for group in groups:
            computed.extend(group)
            yield group, np.stack([values[k] for k in group])

    def run(rows: list[str]) -> chunked.ChunkedArray:
        cache = memo.Memo("test", "fp", root=tmp_path / "cache", arrays=True)
        cuts = chunked.boundaries(rows, None, 16)
        chunks = [rows[a:b] for a, b in cuts]
        cache.fill_chunks(
            chunks, _by_rows(rows, compute), batch=5
        )  # chunks of ~16 rows: several batches each
        parts = [chunked.Chunk(memo.part_name(c), len(c), cache.part_path(c)) for c in chunks]
        chunked.write_folder(tmp_path / "out", parts, np.int32, (2, 2))
        return chunked.ChunkedArray(tmp_path / "out")

    first = run(keys[:200])
    assert computed == keys[:200]
    np.testing.assert_array_equal(np.asarray(first), np.stack([values[k] for k in keys[:200]]))
    inodes = {p.name: p.stat().st_ino for p in (tmp_path / "out").glob("part-*.npy")}
    cache_dir = tmp_path / "cache" / "test" / "fp"
    assert all((cache_dir / name).stat().st_ino == ino for name, ino in inodes.items())  # one file
    computed.clear()
    second = run(keys[:150] + keys[200:])  # 50 removed from the middle, 100 appended
    assert computed == keys[200:]
    np.testing.assert_array_equal(np.asarray(second), np.stack([values[k] for k in keys[:150] + keys[200:]]))
    after = {p.name: p.stat().st_ino for p in (tmp_path / "out").glob("part-*.npy")}
    before_the_cut = {
        memo.part_name(keys[a:b]) + ".npy" for a, b in chunked.boundaries(keys[:200], None, 16) if b <= 150
    }
    assert before_the_cut and all(after[name] == inodes[name] for name in before_the_cut)  # not rewritten


def test_a_put_chunk_takes_old_rows_from_other_parts(tmp_path):
    cache = memo.Memo("test", "fp", root=tmp_path, arrays=True)
    cache.put(pd.DataFrame({"sha256": ["a", "b"]}), np.array([[1], [2]], np.int64))
    cache.put_chunk(["b", "c", "a"], ["c"], np.array([[3]], np.int64))
    assert cache.holds_part(["b", "c", "a"])
    np.testing.assert_array_equal(np.load(cache.part_path(["b", "c", "a"])), [[2], [3], [1]])


def test_a_folder_on_another_file_system_is_copied(tmp_path):
    source = tmp_path / "part-x.npy"
    np.save(source, np.arange(3, dtype=np.int64))
    with tmpfs(tmp_path / "other", 1 << 20) as other:
        assert chunked.copy_bytes(tmp_path, other / "out", 24) == 24
        chunked.write_folder(other / "out", [chunked.Chunk("part-x", 3, source)], np.int64, ())
        np.testing.assert_array_equal(np.asarray(chunked.ChunkedArray(other / "out")), np.arange(3))
    assert chunked.copy_bytes(tmp_path, tmp_path / "out", 24) == 0


def test_a_folder_is_updated_in_place_and_keeps_the_chunks_whose_bytes_stay(tmp_path):
    keys = _keys(range(400))
    cache = memo.Memo("test", "fp", root=tmp_path / "cache", arrays=True)
    values = {k: np.full((3,), i, np.int32) for i, k in enumerate(keys)}

    def compute(groups):
        for group in groups:
            yield group, np.stack([values[k] for k in group])

    def write(rows: list[str]) -> dict[str, int]:
        chunks = [rows[a:b] for a, b in chunked.boundaries(rows, None, 16)]
        cache.fill_chunks(chunks, _by_rows(rows, compute))
        parts = [chunked.Chunk(memo.part_name(c), len(c), cache.part_path(c)) for c in chunks]
        chunked.write_folder(tmp_path / "out", parts, np.int32, (3,))
        return {p.name: p.stat().st_ino for p in (tmp_path / "out").iterdir() if p.name != chunked.INDEX}

    first = write(keys[:300])
    # A copy instead of the memo's link, as DVC leaves a committed output: it is not rewritten.
    name = sorted(first)[0]
    copy = (tmp_path / "out" / name).read_bytes()
    (tmp_path / "out" / name).unlink()
    (tmp_path / "out" / name).write_bytes(copy)
    first[name] = (tmp_path / "out" / name).stat().st_ino
    grown = write(keys[:280] + keys[300:])  # 20 removed at the end of the first run, 100 added
    stays = set(first) & set(grown)
    assert len(stays) >= len(first) - 3 and all(first[n] == grown[n] for n in stays)
    assert name in stays  # the copy stayed: nothing rewrote it
    np.testing.assert_array_equal(
        np.asarray(chunked.ChunkedArray(tmp_path / "out")),
        np.stack([values[k] for k in keys[:280] + keys[300:]]),
    )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary
    # Other settings give the same keys other bytes: a file of the same name is replaced.
    values.update({k: v + 1000 for k, v in values.items()})
    cache = memo.Memo("test", "other settings", root=tmp_path / "cache", arrays=True)
    other = write(keys[:280] + keys[300:])
    assert set(other) == set(grown) and all(other[n] != grown[n] for n in other)
    assert int(np.asarray(chunked.ChunkedArray(tmp_path / "out"))[0, 0]) == 1000


def _memo_folder(
    tmp_path, fingerprint: str, shift: int, keys: list[str]
) -> tuple[memo.Memo, list[chunked.Chunk]]:
    """Chunks of `keys` from the memo of `fingerprint`, whose rows are ``shift + i``."""
    cache = memo.Memo("test", fingerprint, root=tmp_path / "cache", arrays=True)

    def compute(groups):  # positions in `keys`: the chunks are its slices
        for group in groups:
            yield group, np.array([[shift + position] for position in group.tolist()], np.int32)

    chunks = [keys[a:b] for a, b in chunked.boundaries(keys, None, 16)]
    cache.fill_chunks(chunks, compute)
    return cache, [chunked.Chunk(memo.part_name(c), len(c), cache.part_path(c)) for c in chunks]


def test_under_the_same_origin_a_copy_of_a_chunk_is_kept_without_reading_it(tmp_path, monkeypatch):
    keys = _keys(range(200))
    cache, parts = _memo_folder(tmp_path, "A", 0, keys)
    out = tmp_path / "out"
    chunked.write_folder(out, parts, np.int32, (1,), origin=cache.origin)
    assert json.loads((out / chunked.INDEX).read_text())["origin"] == "test/A"
    # A copy instead of the memo's link, as DVC checks out an output under its default cache type.
    copy = out / f"{parts[0].name}.npy"
    data = copy.read_bytes()
    copy.unlink()
    copy.write_bytes(data)
    inode = copy.stat().st_ino
    compared = []
    real_cmp = chunked.filecmp.cmp
    monkeypatch.setattr(chunked.filecmp, "cmp", lambda *a, **k: compared.append(a) or real_cmp(*a, **k))
    chunked.write_folder(out, parts, np.int32, (1,), origin=cache.origin)
    assert compared == [] and copy.stat().st_ino == inode
    chunked.write_folder(out, parts, np.int32, (1,))  # no origin: compared byte for byte, kept
    assert len(compared) == 1 and copy.stat().st_ino == inode
    assert np.asarray(chunked.ChunkedArray(out)).ravel().tolist() == list(range(200))


def test_a_run_of_another_origin_that_died_halfway_leaves_no_name_to_trust(tmp_path, monkeypatch):
    keys = _keys(range(200))
    a, parts_a = _memo_folder(tmp_path, "A", 0, keys)
    b, parts_b = _memo_folder(tmp_path, "B", 1000, keys)  # other settings: the same names, other bytes
    out = tmp_path / "out"
    chunked.write_folder(out, parts_a, np.int32, (1,), origin=a.origin)
    replaced = []
    real_replace = chunked.os.replace

    def dies_after_one_chunk(src, dst):
        if str(dst).endswith(".npy") and replaced:
            raise OSError(28, "No space left on device")
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(chunked.os, "replace", dies_after_one_chunk)
    with pytest.raises(OSError):
        chunked.write_folder(out, parts_b, np.int32, (1,), origin=b.origin)
    monkeypatch.setattr(chunked.os, "replace", real_replace)
    assert "origin" not in json.loads((out / chunked.INDEX).read_text())
    chunked.write_folder(out, parts_a, np.int32, (1,), origin=a.origin)
    assert np.asarray(chunked.ChunkedArray(out)).ravel().tolist() == list(range(200))
