"""The sink (`photoprep.ingest.sink`): bodies stored in record order whatever order they arrive in,
waiting in memory and then on disk, each distinct payload once."""

from __future__ import annotations

import hashlib
import tarfile
import threading
import time

import pandas as pd
from downloads import (
    FAST,
    assert_ok,
    photo,
    records,
    run,
)

from photoprep.ingest import store
from photoprep.ingest.store import SHARD_NAME


def test_shards_do_not_depend_on_the_order_responses_arrive_in(cdn, tmp_path):
    ids = [f"img{i:02d}" for i in range(12)]
    for i in ids:
        cdn.add(i, photo(i))
    cdn.slow("img00", 0.2)  # the first record answers last
    first = run(records(cdn.url, *ids), tmp_path / "one")
    cdn.slow("img11", 0.2)  # now the last one does
    second = run(records(cdn.url, *reversed(ids)), tmp_path / "two")
    pd.testing.assert_frame_equal(first, second)
    shards_one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "store").iterdir()}
    shards_two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "store").iterdir()}
    assert shards_one == shards_two


def test_bodies_waiting_behind_a_slow_one_spill_to_disk_and_keep_their_order(cdn, tmp_path):
    ids = [f"img{i:02d}" for i in range(20)]
    for i in ids:
        cdn.add(i, photo(i, 100_000))
    cdn.slow("img00", 0.25)
    p = FAST.model_copy(update={"shard_mb": 1})  # 1 MiB of waiting bodies in memory, then the spill file
    table = run(records(cdn.url, *ids), tmp_path, p)
    for i in ids:
        assert_ok(tmp_path, table, i, photo(i, 100_000))
    assert all(SHARD_NAME.fullmatch(f.name) for f in (tmp_path / "store").iterdir())  # spill removed
    by_place = table.sort_values(["shard", "offset"])
    for _, shard in by_place.groupby("shard"):
        assert list(shard["id"]) == sorted(shard["id"])  # stored in record order


def test_byte_identical_payloads_are_stored_once(cdn, tmp_path):
    same = photo("shared")
    for i in ["a", "b", "c"]:
        cdn.add(i, same)
    table = run(records(cdn.url, "a", "b", "c"), tmp_path)
    assert table["sha256"].nunique() == 1
    assert table[["shard", "offset"]].drop_duplicates().shape[0] == 1
    (shard,) = (tmp_path / "store").iterdir()
    with tarfile.open(shard) as archive:
        assert archive.getnames() == [hashlib.sha256(same).hexdigest()]


def test_two_fresh_runs_give_identical_tables_and_shards(cdn, tmp_path):
    ids = [f"img{i:03d}" for i in range(40)] + ["gone"]
    for i in ids[:-1]:
        cdn.add(i, photo(i, 1000 + 37 * int(i[3:])))
    first = run(records(cdn.url, *ids), tmp_path / "one")
    second = run(records(cdn.url, *ids), tmp_path / "two")
    pd.testing.assert_frame_equal(first, second)
    shards_one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "store").iterdir()}
    shards_two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "store").iterdir()}
    assert shards_one == shards_two


def test_a_stalled_disk_holds_up_no_request(cdn, tmp_path, monkeypatch):
    # The first commit after a body came back stalls until the CDN has seen every request (5 s at
    # most): they all arrive in time only when storing runs beside the event loop, not on it.
    ids = [f"img{i:02d}" for i in range(12)]
    for i in ids:
        cdn.add(i, photo(i))
    all_asked = threading.Event()
    real_commit = store.ShardWriter.commit

    def stalled_commit(writer: store.ShardWriter) -> store.OpenState | None:
        if cdn.total_requests == 0:  # the commit a run starts with
            return real_commit(writer)
        deadline = time.monotonic() + 5
        while not all_asked.is_set() and time.monotonic() < deadline:
            if cdn.total_requests >= len(ids):
                all_asked.set()
            time.sleep(0.01)
        monkeypatch.setattr(store.ShardWriter, "commit", real_commit)  # stall once
        return real_commit(writer)

    monkeypatch.setattr(store.ShardWriter, "commit", stalled_commit)
    p = FAST.model_copy(update={"concurrency": 4, "per_host": 4, "commit_every": 1})
    table = run(records(cdn.url, *ids), tmp_path, p)
    assert all_asked.is_set()
    for i in ids:
        assert_ok(tmp_path, table, i, photo(i))
