"""What the pipeline promises when the disk fills or a folder is read-only (docs/faults-storage.md).

Each case runs the real stage scripts on real file systems (a size-limited tmpfs, a read-only bind
mount; see tests/mounts.py) and asserts the one line the stage ends with, exit code 1, what was
kept, and that the re-run after the fault is cleared equals an uninterrupted run byte for byte:

- a full disk in the middle of a download keeps its committed shards and journal rows, cuts the
  shard in progress back to its last commit, and the re-run asks again at most a tenth of what was
  stored;
- a full memo folder during dedup keeps every memo part written before it (no joblib warning);
- a read-only data/interim stops dedup with one line (no second traceback from the cleanup);
- bucket and features check the space for their chunked arrays before they decode (a memo on
  another file system means copies, not links), and a disk that fills while bucket writes its
  folder stops it with one line and no half folder (never a SIGBUS).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from downloads import photo
from mounts import fill, read_only, resize, tmpfs
from test_faults_download import asked, make_project, one_line, outputs, run_stage, stage_env
from test_incremental import make_project as photo_project

from photoprep.core import errors, io, tables
from photoprep.core.errors import StorageError
from photoprep.images import memo
from photoprep.ingest import journal, store

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# -- a full disk in the middle of a download ------------------------------------------------

FULL_IDS = [f"f{i:05d}" for i in range(2000)]
FULL_PARAMS = {"concurrency": 16, "per_host": 16, "shard_mb": 1}


def test_a_full_disk_mid_download_keeps_what_was_committed_and_the_rerun_ends_byte_identical(tmp_path, cdn):
    for i in FULL_IDS:
        cdn.add(i, photo(i, 2000))
    root = make_project(tmp_path / "full", FULL_IDS, cdn.url_template, FULL_PARAMS)
    raw = root / "data" / "raw"
    with tmpfs(raw, 2 * MIB):  # room for about 800 of the 2,000 photos, stored as 2.5 KB tar members
        done = run_stage(root, "download", "x")
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr)
        print(line)
        committed = journal.read_journal(raw / "x")
        stored = len(committed.rows)
        assert line == (
            f"photoprep: download@x: data/raw/x: No space left on device (ENOSPC); kept {stored:,} of "
            "2,000 ids (shards and status rows committed): free space there or move data/ to a disk "
            "with room, then run it again to resume"
        )
        assert 500 < stored < 1500
        # The shard in progress is cut back to the commit, not removed; no other temporary shard.
        progress = committed.open_shard
        assert progress is not None
        assert sorted(p.name for p in (raw / "x").glob(".tmp-*")) == [progress.tmp_name]
        assert (raw / "x" / progress.tmp_name).stat().st_size == progress.length
        finished = sorted((raw / "x").glob("shard-*.tar"))
        assert finished and all(store.verify_shard(p)[0] for p in finished)

        first = set(asked(cdn, 0))
        before = cdn.total_requests
        resize(raw, 64 * MIB)  # space again
        again = run_stage(root, "download", "x")
        assert again.returncode == 0, again.stderr
        assert again.stdout.startswith(f"download@x: 2,000 ids: 2,000 ok ({stored:,} reused, ")
        second = set(asked(cdn, before))
        twice = first & second
        print(f"ENOSPC: {len(first)} ids asked before the fault, {stored} stored, {len(twice)} asked again")
        assert len(twice) <= 0.1 * stored, f"{len(twice)} of {stored} stored ids asked again"
        assert first | second == set(FULL_IDS)
        resumed = outputs(root)
    straight = make_project(tmp_path / "straight", FULL_IDS, cdn.url_template, FULL_PARAMS)
    assert run_stage(straight, "download", "x").returncode == 0
    assert resumed == outputs(straight)


def test_a_full_disk_under_a_partitioned_download_says_what_each_partition_keeps(tmp_path, cdn):
    for i in FULL_IDS:
        cdn.add(i, photo(i, 2000))
    params = {**FULL_PARAMS, "partitions": 2}
    root = make_project(tmp_path / "full", FULL_IDS, cdn.url_template, params)
    raw = root / "data" / "raw"
    with tmpfs(raw, 2 * MIB):
        done = run_stage(root, "download", "x")
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr)  # sent back from a joblib worker as the same error
        print(line)
        assert re.fullmatch(
            r"photoprep: download@x: data/raw/x/part-000[01]: No space left on device \(ENOSPC\); each "
            r"of the 2 partitions keeps the shards and status rows it had committed \(in "
            r"data/raw/x/part-NNNN/\): free space there or move data/ to a disk with room, then run it "
            r"again to resume",
            line,
        ), line
        stored = sum(len(journal.read_journal(part).rows) for part in (raw / "x").glob("part-*"))
        first = set(asked(cdn, 0))
        before = cdn.total_requests
        resize(raw, 64 * MIB)
        assert run_stage(root, "download", "x").returncode == 0
        twice = first & set(asked(cdn, before))
        print(
            f"ENOSPC, 2 partitions: {len(first)} ids asked before, {stored} stored, {len(twice)} asked again"
        )
        # Each partition stops on its own, committing what it stored: only what was in flight is asked again.
        assert len(twice) <= 0.1 * stored, f"{len(twice)} of {stored} stored ids asked again"
        resumed = outputs(root)
    straight = make_project(tmp_path / "straight", FULL_IDS, cdn.url_template, params)
    assert run_stage(straight, "download", "x").returncode == 0
    assert resumed == outputs(straight)


# -- the data stages: a synthetic source of local photos --------------------------------------

PHOTOS, BATCH = 120, 4
DEDUP_OUTPUTS = ("data/interim/dedup.parquet", "reports/duplicates.csv", "reports/counts/dedup.json")
BUCKET_OUTPUTS = ("data/processed/images", "data/processed/images.parquet", "reports/counts/bucket.json")
FEATURES_OUTPUTS = (
    "data/features/features",
    "data/features/features.parquet",
    "data/features/features.json",
)


def stage(root: Path, name: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """`python stages/<name>.py` in `root`, its memos in `cache` (default: the project's .photoprep)."""
    env = stage_env()
    env.pop(memo.CACHE_ENV, None)
    if cache is not None:
        env[memo.CACHE_ENV] = str(cache)
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def stops(done: subprocess.CompletedProcess) -> str:
    """The one line a stage stopped with (exit 1, no traceback, nothing else on stderr)."""
    assert done.returncode == 1, done.stderr
    return one_line(done.stderr)


def decodes(cache: Path, namespace: str) -> dict:
    """The latest decode record of `namespace` in the memo log of `cache`."""
    log = [json.loads(line) for line in (cache / "decodes.jsonl").read_text().splitlines()]
    return [entry for entry in log if entry["stage"] == namespace][-1]


def _contents(path: Path) -> bytes | dict[str, bytes]:
    if path.is_dir():  # a chunked array: each file's name and bytes
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


def same(root: Path, clean: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert _contents(root / name) == _contents(clean / name), name


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of download, dedup, validate, bucket and features over the photos."""
    root = photo_project(tmp_path_factory.mktemp("clean"), PHOTOS, batch_size=BATCH)
    for name, *args in (("download", "syn"), ("dedup",), ("validate",), ("bucket",), ("features",)):
        ok(stage(root, name, *args))
    return root


def project_before(root: Path, upto: str) -> Path:
    """A project over the photos holding the outputs of the stages before `upto` (dedup, bucket or
    features)."""
    photo_project(root, PHOTOS, batch_size=BATCH)
    before = ("download", "dedup", "validate", "bucket")
    for name in before[: before.index(upto) if upto in before else len(before)]:
        ok(stage(root, name, *(["syn"] if name == "download" else [])))
    return root


def test_a_full_memo_folder_during_dedup_keeps_its_parts_and_the_rerun_ends_byte_identical(tmp_path, clean):
    root = project_before(tmp_path / "p", "dedup")
    params = (root / "params.yaml").read_text().replace("n_jobs: 1", "n_jobs: 2")  # joblib's workers
    (root / "params.yaml").write_text(params)
    cache = tmp_path / "cache"
    with tmpfs(cache, 160 << 10):  # room for about a third of the probe's parts
        line = stops(stage(root, "dedup", cache=cache))
        print(line)
        (folder,) = (cache / "probe").iterdir()
        parts = sorted(folder.glob("part-*.parquet"))
        assert line == (
            f"photoprep: dedup: {folder}: No space left on device (ENOSPC); the memo keeps the "
            f"{len(parts)} parts it holds (not decoded again): free space there or set PHOTOPREP_CACHE "
            "to a folder on a disk with room, then run it again to resume"
        )
        assert 5 <= len(parts) < PHOTOS // BATCH
        assert not [p for p in folder.iterdir() if p.suffix != ".parquet"], "no temporary or orphan file"
        assert not (root / "data" / "interim").exists()

        resize(cache, 64 * MIB)
        ok(stage(root, "dedup", cache=cache))
        probe = decodes(cache, "probe")
        assert (probe["cached"], probe["decoded"]) == (len(parts) * BATCH, PHOTOS - len(parts) * BATCH)
    same(root, clean, DEDUP_OUTPUTS)


def test_a_read_only_interim_folder_stops_dedup_with_one_line_and_the_rerun_ends_byte_identical(
    tmp_path, clean
):
    root = project_before(tmp_path / "p", "dedup")
    interim = root / "data" / "interim"
    with read_only(interim):
        line = stops(stage(root, "dedup"))
        print(line)
        assert line == (
            # the table steps' input, written first: the stage's scratch beside its output
            "photoprep: dedup: data/interim/.dedup-input.parquet: Read-only file system (EROFS): "
            "make it writable "
            "(remount it read-write) or move data/ to a writable disk, then run it again"
        )
    assert list(interim.iterdir()) == []
    ok(stage(root, "dedup"))
    assert decodes(root / ".photoprep" / "cache", "probe")["decoded"] == 0  # the memo kept every probe
    same(root, clean, DEDUP_OUTPUTS)


def _array_bytes(name: str, clean: Path) -> int:
    """The bytes of the array `name` writes for the demo's photos (uint8 pixels, float32 features)."""
    if name == "bucket":
        return PHOTOS * 64 * 64 * 3
    return PHOTOS * json.loads((clean / "data" / "features" / "features.json").read_text())["dim"] * 4


# (stage, its output folder, the array it writes, its memo folder, the tmpfs size, its outputs)
SPACE_CHECKS = {
    "bucket": ("data/processed", "images", "pixels", 1 * MIB, BUCKET_OUTPUTS),
    "features": ("data/features", "features", "features", 512 << 10, FEATURES_OUTPUTS),
}


@pytest.mark.parametrize("name", list(SPACE_CHECKS))
def test_a_stage_checks_the_space_for_its_array_before_it_decodes(tmp_path, clean, name):
    folder, array, cache, limit, outputs = SPACE_CHECKS[name]
    root = project_before(tmp_path / "p", name)
    out = root / folder
    with tmpfs(out, limit):
        free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
        line = stops(stage(root, name))
        print(line)
        assert line == (
            f"photoprep: {name}: {folder}/{array}: not enough free space to start (ENOSPC, "
            f"needs {errors.human_bytes(_array_bytes(name, clean))}, {errors.human_bytes(free)} free); "
            "nothing written: free space there or move data/ to a disk with room, then run it again"
        )
        assert list(out.iterdir()) == []
        assert not (root / ".photoprep" / "cache" / cache).exists(), "nothing decoded before the check"
        resize(out, 4 * MIB)
        ok(stage(root, name))
        same(root, clean, outputs)


def test_a_disk_that_fills_while_bucket_runs_stops_it_with_one_line_and_leaves_no_half_folder(
    tmp_path, clean
):
    root = project_before(tmp_path / "p", "bucket")
    processed = root / "data" / "processed"
    pixels = root / ".photoprep" / "cache" / "pixels"
    with tmpfs(processed, 4 * MIB):
        env = stage_env()
        env.pop(memo.CACHE_ENV, None)
        child = subprocess.Popen(
            [sys.executable, str(REPO / "stages" / "bucket.py")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Past the space check (it decodes), another program fills the disk under data/processed.
        deadline = time.monotonic() + 60
        while not list(pixels.glob("*/part-*.npy")):
            assert child.poll() is None and time.monotonic() < deadline, "bucket wrote no memo part"
            time.sleep(0.002)
        child.send_signal(signal.SIGSTOP)
        ballast = fill(processed)
        child.send_signal(signal.SIGCONT)
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 1, stderr
        size = PHOTOS * 64 * 64 * 3
        print(one_line(stderr))
        assert one_line(stderr) == (
            f"photoprep: bucket: data/processed/images: No space left on device (ENOSPC, needs "
            f"{errors.human_bytes(size)}): free space there or move data/ to a disk with room, then run it "
            "again"
        )
        assert sorted(p.name for p in processed.iterdir()) == ["ballast"], "no temporary file left"
        ballast.unlink()
        ok(stage(root, "bucket"))
        assert decodes(root / ".photoprep" / "cache", "pixels")["decoded"] == 0  # every image was memoized
        same(root, clean, BUCKET_OUTPUTS)


# -- the one place OS errors become lines ------------------------------------------------------


def test_run_stage_says_an_error_a_user_can_act_on_in_one_line_and_keeps_the_traceback_of_any_other(capsys):
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "data/processed/images.npy")

    with pytest.raises(SystemExit) as stop:
        errors.run_stage(full, "bucket")
    assert stop.value.code == 1
    assert capsys.readouterr().err == (
        "photoprep: bucket: data/processed/images.npy: No space left on device (ENOSPC): free space there "
        "or move data/ to a disk with room, then run it again\n"
    )

    def missing() -> None:
        raise OSError(errno.ENOENT, "No such file or directory", "data/interim/valid.parquet")

    with pytest.raises(FileNotFoundError):
        errors.run_stage(missing, "bucket")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (
            errno.EDQUOT,
            "Disk quota exceeded (EDQUOT): free space within your quota or set PHOTOPREP_CACHE to a "
            "folder on a disk with room",
        ),
        (
            errno.EACCES,
            "Permission denied (EACCES): give this user access to it (owner and mode) or set "
            "PHOTOPREP_CACHE to a folder on a writable disk",
        ),
        (errno.EIO, "Input/output error (EIO): check the disk (dmesg, fsck)"),
    ],
)
def test_each_errno_a_user_can_act_on_says_what_to_do(tmp_path, monkeypatch, code, says):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    error = StorageError(code, tmp_path / "cache" / "probe")
    assert errors.describe_storage_error(error) == f"{tmp_path}/cache/probe: {says}, then run it again"
    again = pickle.loads(pickle.dumps(error.keeping("kept 3 parts")))  # as joblib sends it back
    assert (type(again), again.errno, again.kept) == (StorageError, code, "kept 3 parts")


def test_a_table_written_into_a_read_only_folder_is_one_error_naming_it_and_leaves_nothing(tmp_path):
    with read_only(tmp_path / "ro") as folder, pytest.raises(StorageError) as caught:
        io.write_table(pd.DataFrame({"a": [1]}), folder / "t.parquet")
    error = caught.value
    assert (error.errno, error.filename) == (errno.EROFS, str(tmp_path / "ro" / "t.parquet"))
    # The cleanup of the temporary name adds no second error: only the cause, from Arrow.
    assert error.__cause__ is not None and error.__cause__.__context__ is None
    assert list((tmp_path / "ro").iterdir()) == []


def test_a_disk_that_fills_under_a_tables_waiting_rows_is_one_error_naming_the_table_and_leaves_nothing(
    tmp_path,
):
    """The rows waiting for their row group wait in a scratch file beside the table
    (photoprep.core.spill): a full disk there is the table's StorageError, the scratch file goes,
    and the table written before stays as it was."""
    frame = pd.DataFrame({"a": [f"{i:064d}" for i in range(20_000)]})
    with tmpfs(tmp_path / "small", 1 * MIB) as folder:
        io.write_table(frame.iloc[:10], folder / "t.parquet")
        before = (folder / "t.parquet").read_bytes()
        with pytest.raises(StorageError) as caught, tables.TableWriter(folder / "t.parquet") as out:
            for start in range(0, len(frame), 1_000):  # 1.4 MB of Arrow in all: more than the disk
                out.write(frame.iloc[start : start + 1_000])
        assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(folder / "t.parquet"))
        assert [p.name for p in folder.iterdir()] == ["t.parquet"]
        assert (folder / "t.parquet").read_bytes() == before


def test_an_array_too_large_for_its_disk_is_an_error_before_any_page_is_written(tmp_path):
    with tmpfs(tmp_path / "small", 256 << 10) as folder:
        with pytest.raises(StorageError) as caught:
            io.write_array(np.ones(MIB, np.uint8), folder / "a.npy")
        assert (caught.value.errno, caught.value.needed) == (errno.ENOSPC, MIB)
        assert list(folder.iterdir()) == []


def test_the_space_check_adds_up_what_shares_a_disk(tmp_path):
    with tmpfs(tmp_path / "small", 1 * MIB) as folder:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        io.require_space(
            [(folder / "a.npy", free // 2), (folder / "memo", free // 2), (tmp_path / "b", free)]
        )
        with pytest.raises(StorageError) as caught:
            io.require_space([(folder / "a.npy", free // 2), (folder / "memo" / "x", free // 2 + 1)])
        error = caught.value
        assert (error.filename, error.needed, error.free) == (str(folder / "a.npy"), free + 1, free)
        assert error.checked and error.kept == "nothing written"
