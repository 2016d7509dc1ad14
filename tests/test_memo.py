"""The decode-once memo: rows and arrays keyed by sha256 under a fingerprint."""

import io

import numpy as np
import pandas as pd
import pytest
from mounts import tmpfs

from photoprep.core.errors import StorageError
from photoprep.images import memo
from photoprep.ingest import sniff


def test_rows_and_arrays_come_back_in_the_order_asked(tmp_path):
    cache = memo.Memo("probe", "fp", root=tmp_path)
    cache.put(pd.DataFrame({"sha256": ["a", "b"], "width": [1, 2]}), np.array([[1], [2]], np.uint8))
    cache.put(pd.DataFrame({"sha256": ["c"], "width": [3]}), np.array([[3]], np.uint8))
    again = memo.Memo("probe", "fp", root=tmp_path)
    assert again.missing(["c", "d", "a", "d"]) == ["d"]
    rows, distinct = again.missing_rows(["c", "d", "a", "e", "d", "e"])
    assert rows.tolist() == [1, 3] and distinct == 4  # the first row of each missing key
    assert list(again.rows(["c", "a", "c"])["width"]) == [3, 1, 3]
    assert again.arrays(["b", "c", "a"]).ravel().tolist() == [2, 3, 1]


def test_the_key_index_finds_each_key_where_it_was_first_put_in_the_array_or_beside_it(monkeypatch):
    monkeypatch.setattr(memo.KeyIndex, "MERGE", 3)  # the first parts join the sorted array
    index = memo.KeyIndex()
    index.add("p1", ["f", "a", "f"])
    index.add("p2", ["a", "c", "b"])  # "a" stays p1's; three keys join the array
    index.add("p3", ["e", "c"])  # waits beside the array
    assert len(index) == 5
    assert "e" in index and "b" in index and "z" not in index
    assert index.where(["a", "b", "c", "e", "f", "z", "ff"]).tolist() == [
        1,
        2 | 1 << 32,
        1 | 1 << 32,
        2 << 32,
        0,
        -1,
        -1,
    ]
    located = [
        (name, slots.tolist(), positions.tolist())
        for name, slots, positions in index.locate(["e", "f", "b", "a"])
    ]
    assert located == [("p3", [0], [0]), ("p1", [1, 3], [0, 1]), ("p2", [2], [2])]


def test_a_memo_of_many_parts_finds_every_key_after_the_index_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(memo.KeyIndex, "MERGE", 4)
    cache = memo.Memo("pixels", "fp", root=tmp_path, arrays=True)
    keys = [f"{i:064x}" for i in range(40)]
    for start in range(0, 40, 5):
        part = keys[start : start + 5]
        cache.put(pd.DataFrame({"sha256": part}), np.arange(start, start + 5, dtype=np.int32)[:, None])
    again = memo.Memo("pixels", "fp", root=tmp_path, arrays=True)
    assert len(again) == 40 and again.parts == 8
    asked = [*keys[::-3], "f" * 64]
    assert again.missing(asked) == ["f" * 64]
    assert again.arrays(asked[:-1]).ravel().tolist() == list(range(39, -1, -3))


def test_another_fingerprint_sees_nothing(tmp_path):
    memo.Memo("probe", "one", root=tmp_path).put(pd.DataFrame({"sha256": ["a"], "width": [1]}))
    assert memo.Memo("probe", "two", root=tmp_path).missing(["a"]) == ["a"]


def test_fingerprint_changes_with_settings_and_code():
    base = memo.fingerprint({"hash": "phash", "hash_size": 8}, sniff)
    assert base == memo.fingerprint({"hash_size": 8, "hash": "phash"}, sniff)
    assert base != memo.fingerprint({"hash": "phash", "hash_size": 16}, sniff)
    assert base != memo.fingerprint({"hash": "phash", "hash_size": 8}, memo)


def test_decode_log_sits_beside_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path))
    memo.log_decodes("probe", decoded=3, cached=5)
    assert (tmp_path / "decodes.jsonl").read_text() == '{"stage": "probe", "decoded": 3, "cached": 5}\n'


def _two_parts(root, arrays=True):
    cache = memo.Memo("pixels", "fp", root=root, arrays=arrays)
    cache.put(pd.DataFrame({"sha256": ["a", "b"]}), np.array([[1], [2]], np.uint8))
    cache.put(pd.DataFrame({"sha256": ["c"]}), np.array([[3]], np.uint8))
    return cache.directory, memo.part_name(["a", "b"])


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_filled_parts_keep_only_their_keys_in_memory_and_read_their_rows_when_asked(tmp_path):
    cache = memo.Memo("probe", "fp", root=tmp_path)
    todo = ["b", "a", "c"]
    batches = [(["b", "a"], [2, 1]), (["c"], [3])]
    cache.fill(todo, batches, lambda keys, widths: (pd.DataFrame({"sha256": keys, "width": widths}), None))
    assert cache.missing(["a", "c", "d"]) == ["d"]
    # The rows come from the parts' files, not from the heap: a file changed since is read as it is.
    for path in tmp_path.rglob("*.parquet"):
        rows = pd.read_parquet(path)
        rows.assign(width=rows["width"] * 10).to_parquet(path, index=False)
    assert list(cache.rows(["c", "a", "b"])["width"]) == [30, 10, 20]
    cache.put(pd.DataFrame({"sha256": ["e"], "width": [5]}))  # put: held, as before
    for path in tmp_path.rglob("*.parquet"):
        path.unlink()
    assert list(cache.rows(["e"])["width"]) == [5]


def test_a_truncated_table_part_is_discarded_with_a_line_and_recomputed(tmp_path, capsys):
    directory, name = _two_parts(tmp_path)
    _truncate(directory / f"{name}.parquet")
    again = memo.Memo("pixels", "fp", root=tmp_path, arrays=True)
    assert again.missing(["a", "b", "c"]) == ["a", "b"]
    assert again.discarded == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "damaged" in err and "Traceback" not in err
    assert not (directory / f"{name}.parquet").exists() and not (directory / f"{name}.npy").exists()
    again.put(pd.DataFrame({"sha256": ["a", "b"]}), np.array([[1], [2]], np.uint8))
    assert memo.Memo("pixels", "fp", root=tmp_path, arrays=True).arrays(["c", "b", "a"]).ravel().tolist() == [
        3,
        2,
        1,
    ]


def test_a_short_or_missing_array_makes_its_part_damaged(tmp_path, capsys):
    directory, name = _two_parts(tmp_path)
    _truncate(directory / f"{name}.npy", keep=0.9)
    assert memo.Memo("pixels", "fp", root=tmp_path, arrays=True).missing(["a", "c"]) == ["a"]
    directory, name = _two_parts(tmp_path / "other")
    (directory / f"{name}.npy").unlink()
    assert memo.Memo("pixels", "fp", root=tmp_path / "other", arrays=True).missing(["a", "c"]) == ["a"]
    assert capsys.readouterr().err.count("damaged") == 2


def test_a_part_whose_keys_do_not_match_its_name_is_not_trusted(tmp_path):
    directory, name = _two_parts(tmp_path, arrays=False)
    pd.DataFrame({"sha256": ["a", "x"]}).to_parquet(directory / f"{name}.parquet", index=False)
    assert memo.Memo("pixels", "fp", root=tmp_path).missing(["a", "x", "c"]) == ["a", "x"]


def test_temporaries_of_dead_runs_are_removed_and_row_parts_compact(tmp_path):
    cache = memo.Memo("probe", "fp", root=tmp_path)
    for key in "abcde":
        cache.put(pd.DataFrame({"sha256": [key], "width": [ord(key)]}))
    dead = cache.directory / ".part-x.parquet.999999999-0a1b.tmp"
    dead.write_bytes(b"half")
    cache.compact()
    assert cache.parts == 1 and len(list(cache.directory.glob("part-*.parquet"))) == 1
    again = memo.Memo("probe", "fp", root=tmp_path)
    assert not dead.exists()
    assert list(again.rows(["e", "a"])["width"]) == [ord("e"), ord("a")]


def _batches(values: dict[str, np.ndarray], keys: list[str]):
    """A `fill_chunks` compute for chunks that are slices of `keys`: a batch is their positions."""

    def compute(groups):
        for group in groups:
            yield group, np.stack([values[keys[position]] for position in group.tolist()])

    return compute


def test_a_chunk_of_new_rows_streams_to_the_same_bytes_that_np_save_writes(tmp_path):
    keys = [f"{i:064x}" for i in range(23)]
    values = {k: np.full((3, 2), i, np.float32) for i, k in enumerate(keys)}
    cache = memo.Memo("features", "fp", root=tmp_path, arrays=True)
    chunks = [keys[:10], keys[10:]]
    assert cache.fill_chunks(chunks, _batches(values, keys), batch=4) == 23  # batches straddle the chunks
    for chunk in chunks:
        buffer = io.BytesIO()
        np.save(buffer, np.stack([values[k] for k in chunk]))
        assert cache.part_path(chunk).read_bytes() == buffer.getvalue()
    again = memo.Memo("features", "fp", root=tmp_path, arrays=True)  # the parts verify on a load
    assert all(again.holds_part(chunk) for chunk in chunks)
    np.testing.assert_array_equal(again.arrays(keys[8:12]), np.stack([values[k] for k in keys[8:12]]))
    assert not [p.name for p in cache.directory.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_a_chunk_streams_keeps_the_chunks_before_and_leaves_no_half_part(tmp_path):
    keys = [f"{i:064x}" for i in range(40)]
    values = {k: np.full(8192, i, np.uint8) for i, k in enumerate(keys)}  # 8 KB a row
    chunks = [keys[i : i + 10] for i in range(0, 40, 10)]
    with tmpfs(tmp_path / "small", 256 << 10) as small:
        cache = memo.Memo("pixels", "fp", root=small, arrays=True)
        with pytest.raises(StorageError) as caught:
            cache.fill_chunks(chunks, _batches(values, keys), batch=4)
        assert str(cache.directory) in str(caught.value)
        names = sorted(p.name for p in cache.directory.iterdir())
        assert not [name for name in names if name.endswith(".tmp")]
        arrays = {name[: -len(".npy")] for name in names if name.endswith(".npy")}
        tables = {name[: -len(".parquet")] for name in names if name.endswith(".parquet")}
        assert arrays == tables and arrays  # no array without its table; some chunks kept
        again = memo.Memo("pixels", "fp", root=small, arrays=True)
        held = [chunk for chunk in chunks if again.holds_part(chunk)]
        assert held == chunks[: len(held)] and 0 < len(held) < len(chunks)


def test_a_key_in_two_chunks_is_computed_once_for_its_first_row_and_a_rerun_computes_only_new_rows(tmp_path):
    keys = [f"{i:064x}" for i in range(13)]
    values = {k: np.full(4, i, np.int16) for i, k in enumerate(keys)}
    asked: list[int] = []

    def compute_for(rows: list[str]):
        def compute(groups):
            for group in groups:
                asked.extend(group.tolist())
                yield group, np.stack([values[rows[position]] for position in group.tolist()])

        return compute

    rows = [*keys[:8], keys[2], *keys[8:12]]  # row 8 repeats row 2, in the second chunk
    chunks = [rows[:5], rows[5:]]
    cache = memo.Memo("features", "fp", root=tmp_path, arrays=True)
    assert cache.fill_chunks(chunks, compute_for(rows), batch=3) == 12
    assert asked == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]
    for chunk in chunks:
        np.testing.assert_array_equal(np.load(cache.part_path(chunk)), np.stack([values[k] for k in chunk]))
    asked.clear()
    grown = [*rows, keys[12]]  # the last chunk gains a row: its old rows are read, not computed
    chunks = [grown[:5], grown[5:]]
    assert cache.fill_chunks(chunks, compute_for(grown), batch=3) == 1
    assert asked == [13]
    np.testing.assert_array_equal(
        np.load(cache.part_path(chunks[1])), np.stack([values[k] for k in chunks[1]])
    )
