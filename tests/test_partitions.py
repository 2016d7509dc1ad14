"""download.partitions: the ids split by a hash of the id, one fetch task per partition.

Against a real loopback CDN, with the partitions run as joblib worker processes."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from photoprep.core.params import ComputeParams, DownloadParams
from photoprep.ingest import partitions
from photoprep.ingest.blobs import BlobReader, check_shard_name
from photoprep.ingest.fetch import Place

FAST = {
    "concurrency": 8,
    "per_host": 8,
    "connect_timeout": 2.0,
    "read_timeout": 1.0,
    "retries": 2,
    "backoff_base": 0.01,
}
COMPUTE = ComputeParams(n_jobs=2)
IDS = [f"p{i:03d}" for i in range(60)]


def photo(id_: str) -> bytes:
    seed = hashlib.sha256(id_.encode()).digest()
    return (b"\xff\xd8\xff\xe0" + seed * 80)[:2500]


def records(cdn, ids) -> pd.DataFrame:
    return pd.DataFrame({"source": "demo", "id": list(ids), "url": [cdn.url(i) for i in ids]})


def download(cdn, ids, store: Path, parts: int, previous=None):
    table_path = store.parent / f"{store.name}.parquet"
    p = DownloadParams(**FAST, partitions=parts)
    place = Place(store, store.parent, table_path)
    return partitions.download(records(cdn, ids), place, p, COMPUTE, previous)


@pytest.fixture
def served(cdn):
    for id_ in IDS:
        cdn.add(id_, photo(id_))
    cdn.fail("p007", 404, times=None)
    return cdn


def test_partition_is_fixed_by_the_id_and_spreads_the_ids():
    frame = pd.DataFrame({"source": "s", "id": [f"id{i}" for i in range(4000)]})
    parts = partitions.partition_of(frame, 8)
    assert parts.min() == 0 and parts.max() == 7
    assert np.bincount(parts).min() > 4000 / 8 * 0.8  # roughly even
    # Adding lines (in any order) moves no id to another partition.
    more = pd.concat([frame.iloc[::-1], pd.DataFrame({"source": "s", "id": ["new1", "new2"]})])
    again = dict(zip(more["id"], partitions.partition_of(more, 8), strict=True))
    assert all(again[i] == k for i, k in zip(frame["id"], parts, strict=True))


def test_the_caps_are_divided_among_the_tasks():
    p = partitions.partition_params(DownloadParams(concurrency=64, per_host=10, partitions=4))
    assert (p.concurrency, p.per_host) == (16, 3)
    assert partitions.partition_params(DownloadParams(concurrency=2, per_host=1, partitions=8)).per_host == 1


def test_partitions_fetch_what_one_download_fetches_each_in_its_folder(served, tmp_path):
    one = download(served, IDS, tmp_path / "one", 1)
    three = download(served, IDS, tmp_path / "three", 3)
    compared = ["source", "id", "status", "reason", "sha256", "size", "mime"]
    pd.testing.assert_frame_equal(one.table[compared], three.table[compared])
    assert (three.table.loc[three.table["id"] == "p007", "reason"] == "http_404").all()
    ok = three.table[three.table["status"] == "ok"]
    assert ok["shard"].str.match(r"part-000[0-2]/shard-[0-9a-f]{16}\.tar$").all()
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["part-0000", "part-0001", "part-0002"]
    with BlobReader(tmp_path / "three") as reader:
        for r in ok.itertuples():
            data = reader.read(r.shard, r.offset, r.size)
            assert hashlib.sha256(data).hexdigest() == r.sha256 == hashlib.sha256(photo(r.id)).hexdigest()
    written = pd.read_parquet(tmp_path / "three.parquet")
    pd.testing.assert_frame_equal(written, three.table)


def test_two_partitioned_runs_give_the_same_bytes_and_a_rerun_fetches_nothing(served, tmp_path):
    download(served, IDS, tmp_path / "a", 4)
    download(served, IDS, tmp_path / "b", 4)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    shards = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("shard-*.tar")}
    assert shards == {
        p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("shard-*.tar")
    }
    before = served.total_requests
    again = download(served, IDS, tmp_path / "a", 4, previous=pd.read_parquet(tmp_path / "a.parquet"))
    # Only the failed id is asked again; every ok row is reused from its partition's table.
    assert again.reused == len(IDS) - 1 and again.requested == 1
    assert served.total_requests - before <= 1 + FAST["retries"]
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_added_ids_are_fetched_in_their_own_partitions_only(served, tmp_path):
    first = download(served, IDS[:40], tmp_path / "s", 3)
    assert first.requested == 40
    grown = download(served, IDS, tmp_path / "s", 3)
    assert grown.requested == 20 + 1 and grown.reused == 39  # the new ids, and the failed one again


@pytest.mark.parametrize(
    "name",
    ["part-0001/../shard-0123456789abcdef.tar", "../part-0001/shard-0123456789abcdef.tar", "part-1/x.tar"],
)
def test_a_table_cannot_name_a_path_through_a_partition(name):
    with pytest.raises(ValueError, match="not a shard name"):
        check_shard_name(name)
    check_shard_name("part-0001/shard-0123456789abcdef.tar")
