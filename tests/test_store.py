"""The sharded blob store: tar shards named by content, blobs by sha256, written atomically."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from photoprep.ingest import store
from photoprep.ingest.blobindex import BlobRef
from photoprep.ingest.blobs import BlobReader, read_blobs
from photoprep.ingest.store import ShardWriter, index_shards


def blobs(n: int, size: int = 1000, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size + i) for i in range(n)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(directory: Path, items: list[bytes], shard_bytes: int = 1 << 20) -> dict[str, BlobRef]:
    with ShardWriter(directory, shard_bytes) as writer:
        for data in items:
            writer.add(data)
        return writer.flush()


def _ref_tuple(ref: BlobRef) -> tuple[str, int, int]:
    return ref.shard, ref.offset, ref.size


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_blobs_read_back_byte_for_byte(tmp_path):
    items = blobs(20)
    refs = write(tmp_path, items)
    got = read_blobs(tmp_path, [_ref_tuple(refs[sha(d)]) for d in items])
    assert got == items


def test_flush_returns_refs_of_every_blob_and_add_returns_the_sha256(tmp_path):
    items = blobs(3)
    with ShardWriter(tmp_path, 1 << 20) as writer:
        assert [writer.add(d) for d in items] == [sha(d) for d in items]
        refs = writer.flush()
    assert set(refs) == {sha(d) for d in items}


def test_shards_are_tar_files_of_members_named_by_sha256_with_neutral_headers(tmp_path):
    items = blobs(5)
    refs = write(tmp_path, items)
    (shard,) = tmp_path.iterdir()
    assert store.SHARD_NAME.fullmatch(shard.name)
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [sha(d) for d in items]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert (
                archive.extractfile(m).read()
                == read_blobs(tmp_path, [(shard.name, refs[m.name].offset, m.size)])[0]
            )


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar(1) here")
def test_tar_lists_a_shard(tmp_path):
    items = blobs(3)
    write(tmp_path, items)
    (shard,) = tmp_path.iterdir()
    listed = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout
    assert listed.split() == [sha(d) for d in items]


def test_identical_bytes_are_stored_once(tmp_path):
    same = blobs(1)[0]
    refs = write(tmp_path, [same, same, same])
    assert len(refs) == 1
    (shard,) = tmp_path.iterdir()
    with tarfile.open(shard) as archive:
        assert archive.getnames() == [sha(same)]


def test_bytes_already_in_a_shard_on_disk_are_not_stored_again(tmp_path):
    items = blobs(4)
    first = write(tmp_path, items[:3])
    before = shard_files(tmp_path)
    second = write(tmp_path, items)  # a new writer: reads the existing shard's index
    after = shard_files(tmp_path)
    assert len(after) == 2
    (new_name,) = set(after) - set(before)
    with tarfile.open(tmp_path / new_name) as archive:
        assert archive.getnames() == [sha(items[3])]
    assert {k: second[k] for k in first} == first


def test_existing_shards_are_never_modified(tmp_path):
    write(tmp_path, blobs(3))
    before = {
        name: (data, os.stat(tmp_path / name).st_mtime_ns) for name, data in shard_files(tmp_path).items()
    }
    write(tmp_path, blobs(6))
    for name, (data, mtime) in before.items():
        assert (tmp_path / name).read_bytes() == data
        assert os.stat(tmp_path / name).st_mtime_ns == mtime


def test_the_same_sequence_of_blobs_gives_identical_shards(tmp_path):
    items = blobs(30)
    write(tmp_path / "a", items, shard_bytes=8000)
    write(tmp_path / "b", items, shard_bytes=8000)
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")


def test_members_lie_in_the_order_they_were_added(tmp_path):
    items = blobs(5)
    write(tmp_path, items)
    (shard,) = tmp_path.iterdir()
    with tarfile.open(shard) as archive:
        assert archive.getnames() == [sha(d) for d in items]


def test_a_shard_is_named_from_its_content(tmp_path):
    write(tmp_path / "a", blobs(3))
    write(tmp_path / "b", blobs(3, seed=1))
    (a,) = (tmp_path / "a").iterdir()
    (b,) = (tmp_path / "b").iterdir()
    assert a.name != b.name


def test_shards_hold_at_most_shard_bytes_of_payload(tmp_path):
    items = blobs(30, size=1000)
    refs = write(tmp_path, items, shard_bytes=5000)
    payload: dict[str, int] = {}
    for ref in refs.values():
        payload[ref.shard] = payload.get(ref.shard, 0) + ref.size
    assert len(payload) >= 6
    assert max(payload.values()) <= 5000
    assert index_shards(tmp_path) == refs


def test_a_blob_larger_than_a_shard_gets_a_shard_of_its_own(tmp_path):
    big = blobs(1, size=10_000)[0]
    refs = write(tmp_path, [big], shard_bytes=100)
    assert read_blobs(tmp_path, [(refs[sha(big)].shard, refs[sha(big)].offset, len(big))]) == [big]


def test_blobs_go_to_a_temporary_file_until_their_shard_is_closed(tmp_path):
    items = blobs(3)
    with ShardWriter(tmp_path, 1 << 20) as writer:
        for d in items:
            writer.add(d)
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(".tmp-")
        refs = writer.flush()
    assert [p.name for p in tmp_path.iterdir()] == [refs[sha(items[0])].shard]


def test_an_exception_in_the_with_block_writes_no_shard_and_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 1 << 20) as writer:
        for d in blobs(10):
            writer.add(d)
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_exception_keeps_the_shards_already_closed_whole(tmp_path):
    items = blobs(10, size=1000)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 3000) as writer:
        for d in items:
            writer.add(d)
        raise RuntimeError("interrupted")
    left = sorted(tmp_path.iterdir())
    assert left and all(store.SHARD_NAME.fullmatch(p.name) for p in left)
    refs = index_shards(tmp_path)
    assert len(refs) < len(items)
    kept = [d for d in items if sha(d) in refs]
    assert kept == items[: len(kept)]  # the first blobs, in closed shards
    assert read_blobs(tmp_path, [_ref_tuple(refs[sha(d)]) for d in kept]) == kept


def test_a_failure_while_writing_a_shard_leaves_no_partial_shard(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"), ShardWriter(tmp_path, 1 << 20) as writer:
        for d in blobs(5):
            writer.add(d)
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_names_that_are_not_shards(tmp_path):
    write(tmp_path, blobs(1))
    with BlobReader(tmp_path) as reader, pytest.raises(ValueError, match="not a shard name"):
        reader.read("../../etc/passwd", 0, 10)


def test_reading_past_the_end_of_a_shard_is_an_error(tmp_path):
    refs = write(tmp_path, blobs(1))
    (ref,) = refs.values()
    with BlobReader(tmp_path) as reader, pytest.raises(ValueError, match="past the end"):
        reader.read(ref.shard, ref.offset, 10**9)


def test_reader_is_safe_to_share_between_threads(tmp_path):
    items = blobs(200, size=500)
    refs = write(tmp_path, items, shard_bytes=20_000)
    with BlobReader(tmp_path) as reader, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda d: reader.read(*_ref_tuple(refs[sha(d)])), items))
    assert got == items


def test_index_of_an_empty_or_missing_folder_is_empty(tmp_path):
    assert index_shards(tmp_path) == {}
    assert index_shards(tmp_path / "missing") == {}


@pytest.mark.parametrize("size", [0, 1, 511, 512, 76_543, 8**11 - 1])
def test_member_headers_are_what_tarfile_writes(size):
    name = sha(str(size).encode())
    assert store.member_header(name, size) == store.tarfile_header(name, size)


def test_temporary_files_left_by_a_killed_run_are_removed_by_the_next_writer(tmp_path):
    (tmp_path / ".tmp-abc123.tar").write_bytes(b"half a shard")
    (tmp_path / ".tmp-def456.spill").write_bytes(b"waiting bodies")
    write(tmp_path, blobs(2))
    assert all(store.SHARD_NAME.fullmatch(p.name) for p in tmp_path.iterdir())


def test_a_committed_shard_in_progress_is_taken_up_and_gives_the_same_shards(tmp_path):
    items = blobs(30, size=3000)
    expected = write(tmp_path / "straight", items, shard_bytes=40_000)
    writer = ShardWriter(tmp_path / "resumed", 40_000)
    for data in items[:17]:
        writer.add(data)
    state = writer.commit()
    writer.add(items[17])  # added after the commit: lost with the kill
    writer.abandon()
    assert state is not None
    with ShardWriter(tmp_path / "resumed", 40_000, resume=state) as again:
        assert again.holds(sha(items[16])) and not again.holds(sha(items[17]))
        for data in items[17:]:
            again.add(data)
        refs = again.flush()
    assert refs == expected
    assert shard_files(tmp_path / "resumed") == shard_files(tmp_path / "straight")


def test_a_truncated_or_lying_shard_fails_verification_and_is_set_aside(tmp_path):
    refs = write(tmp_path, blobs(3))
    (name,) = {ref.shard for ref in refs.values()}
    path = tmp_path / name
    assert store.verify_shard(path)[1] == ""
    data = path.read_bytes()
    path.write_bytes(data[:-600])
    assert "truncated" in store.verify_shard(path)[1]
    path.write_bytes(data[:124] + b"00000000001\0" + data[136:])  # a size that lies
    assert store.verify_shard(path)[0] is None
    lines = store.set_aside_damaged(tmp_path)
    assert len(lines) == 1 and name in lines[0]
    assert index_shards(tmp_path) == {} and (tmp_path / f".damaged-{name}").exists()


@pytest.mark.parametrize(("at", "what"), [(0, "name"), (100, "mode"), (124, "size"), (148, "checksum")])
def test_a_header_changed_in_any_field_is_caught(tmp_path, at, what):
    refs = write(tmp_path, blobs(3))
    (name,) = {ref.shard for ref in refs.values()}
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    second = next(ref.offset for ref in refs.values() if ref.offset > 512) - 512  # a later header
    data[second + at] = ord("7") if data[second + at] != ord("7") else ord("1")
    path.write_bytes(bytes(data))
    members, problem = store.verify_shard(path)
    assert members is None and problem, what
    lines, index = store.check_shards(tmp_path)
    assert len(lines) == 1 and index == {}
