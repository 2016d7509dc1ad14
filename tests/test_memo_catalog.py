"""The catalogue of a memo with arrays: a load reads one table, and only the parts it does not name."""

import numpy as np
import pandas as pd

from photoprep.images import catalog, memo

KEYS = [f"{i:064x}" for i in range(12)]


def _memo(root) -> memo.Memo:
    return memo.Memo("pixels", "fp", root=root, arrays=True)


def _put(cache: memo.Memo, start: int, stop: int) -> None:
    rows = np.arange(start, stop, dtype=np.int32)[:, None]
    cache.put(pd.DataFrame({"sha256": KEYS[start:stop]}), rows)


def _filled(root, parts=((0, 4), (4, 8), (8, 12))) -> memo.Memo:
    cache = _memo(root)
    for start, stop in parts:
        _put(cache, start, stop)
    cache.write_catalog()
    return cache


def test_a_load_takes_the_catalogued_parts_without_reading_them_and_reads_only_the_others(tmp_path):
    _filled(tmp_path, parts=((0, 4), (4, 8)))
    again = _memo(tmp_path)
    assert again.parts_read == 0 and again.parts == 2 and len(again) == 8
    assert again.arrays(KEYS[7::-3]).ravel().tolist() == [7, 4, 1]
    _put(again, 8, 12)  # put, not catalogued yet: a run that died before writing it
    third = _memo(tmp_path)
    assert third.parts_read == 1 and third.missing(KEYS) == []
    assert third.arrays(KEYS[::-1]).ravel().tolist() == list(range(11, -1, -1))
    third.write_catalog()
    assert _memo(tmp_path).parts_read == 0


def test_fill_chunks_leaves_a_catalogue_so_that_the_next_load_reads_no_part(tmp_path):
    cache = _memo(tmp_path)
    chunks = [KEYS[:5], KEYS[5:]]

    def compute(batches):
        return [(batch, np.array([[position] for position in batch.tolist()], np.int32)) for batch in batches]

    assert cache.fill_chunks(chunks, compute, batch=4) == 12
    again = _memo(tmp_path)
    assert again.parts_read == 0 and all(again.holds_part(c) for c in chunks)
    assert np.load(again.part_path(chunks[1])).ravel().tolist() == list(range(5, 12))


def test_a_part_changed_since_the_catalogue_is_verified_as_before_and_left_out_of_it(tmp_path, capsys):
    cache = _filled(tmp_path)
    npy = cache.directory / f"{memo.part_name(KEYS[4:8])}.npy"
    npy.write_bytes(npy.read_bytes()[:-3])
    again = _memo(tmp_path)
    assert again.discarded == 1 and again.missing(KEYS) == KEYS[4:8]
    assert "damaged" in capsys.readouterr().err
    again.write_catalog()
    names = catalog.read(cache.directory, catalog.file_sizes(cache.directory)).names
    assert names == [memo.part_name(KEYS[:4]), memo.part_name(KEYS[8:])]


def test_a_part_whose_files_are_gone_is_not_taken_from_the_catalogue(tmp_path):
    cache = _filled(tmp_path)
    for suffix in (".npy", ".parquet"):
        (cache.directory / f"{memo.part_name(KEYS[:4])}{suffix}").unlink()
    again = _memo(tmp_path)
    assert again.parts_read == 0 and again.missing(KEYS) == KEYS[:4]
    assert again.arrays(KEYS[4:]).ravel().tolist() == list(range(4, 12))


def test_a_damaged_catalogue_is_discarded_with_a_line_and_the_parts_read_one_by_one(tmp_path, capsys):
    cache = _filled(tmp_path)
    path = cache.directory / catalog.CATALOG
    path.write_bytes(path.read_bytes()[:-20])  # its footer cut short
    again = _memo(tmp_path)
    err = capsys.readouterr().err
    assert again.parts_read == 3 and again.arrays(KEYS).ravel().tolist() == list(range(12))
    assert err.count("\n") == 1 and "catalogue" in err and "Traceback" not in err
    assert not path.exists()
    again.write_catalog()
    assert _memo(tmp_path).parts_read == 0


def test_a_catalogue_that_gives_a_part_other_keys_is_not_trusted_for_that_part(tmp_path):
    cache = _filled(tmp_path)
    path = cache.directory / catalog.CATALOG
    table = pd.read_parquet(path)
    table.loc[5, "key"] = KEYS[0]  # the second part's second key, changed
    table.to_parquet(path, index=False)
    again = _memo(tmp_path)
    assert again.parts_read == 1 and again.arrays(KEYS).ravel().tolist() == list(range(12))


def test_a_memo_of_rows_only_keeps_no_catalogue(tmp_path):
    cache = memo.Memo("probe", "fp", root=tmp_path)
    cache.put(pd.DataFrame({"sha256": ["a"], "width": [1]}))
    cache.write_catalog()
    assert not (cache.directory / catalog.CATALOG).exists()
    assert memo.Memo("probe", "fp", root=tmp_path).parts_read == 1
