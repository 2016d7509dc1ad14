"""The decode-once memo: rows and arrays keyed by sha256 under a fingerprint."""

import numpy as np
import pandas as pd

from photoprep.images import memo
from photoprep.ingest import sniff


def test_rows_and_arrays_come_back_in_the_order_asked(tmp_path):
    cache = memo.Memo("probe", "fp", root=tmp_path)
    cache.put(pd.DataFrame({"sha256": ["a", "b"], "width": [1, 2]}), np.array([[1], [2]], np.uint8))
    cache.put(pd.DataFrame({"sha256": ["c"], "width": [3]}), np.array([[3]], np.uint8))
    again = memo.Memo("probe", "fp", root=tmp_path)
    assert again.missing(["c", "d", "a", "d"]) == ["d"]
    assert list(again.rows(["c", "a", "c"])["width"]) == [3, 1, 3]
    assert again.arrays(["b", "c", "a"]).ravel().tolist() == [2, 3, 1]


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
