"""compute.backend: dask on real engines: a `dask scheduler` and two `dask worker` processes on
127.0.0.1, a LocalCluster, shards read through fsspec, and `dvc repro` of dedup, bucket and
features giving the bytes of a joblib run."""

from __future__ import annotations

import io
import operator
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

import photoprep
from photoprep.core import parallel
from photoprep.core.errors import UserError
from photoprep.core.params import ComputeParams, load
from photoprep.images import hamming
from photoprep.images.probe import ProbeSpec, probe_images
from photoprep.ingest.blobs import RemoteBlobReader, open_reader
from photoprep.ingest.fetch import Place
from photoprep.ingest.store import ShardWriter

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("PHOTOPREP_CACHE", None)
    return env


class CLICluster:
    """`dask scheduler` and `dask worker` processes (1 thread each) on 127.0.0.1, ended on exit."""

    def __init__(self, work: Path, workers: int = 2, pythonpath: Path | None = None):
        self.work = work
        self.workers = workers
        self.env = _env()
        if pythonpath is not None:
            self.env["PYTHONPATH"] = str(pythonpath)
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def _start(self, *args: object) -> None:
        self.procs.append(
            subprocess.Popen(
                [BIN / "dask", *map(str, args)],
                env=self.env, cwd=self.work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip

    def __enter__(self) -> CLICluster:
        file = self.work / "scheduler.json"
        try:
            self._start(
                "scheduler", "--host", "127.0.0.1", "--port", 0, "--no-dashboard", "--scheduler-file", file
            )
            for _ in range(300):
                if file.exists():
                    break
                time.sleep(0.1)
            for i in range(self.workers):
                self._start(
                    "worker", "--no-nanny", "--scheduler-file", file, "--name", f"w{i}", "--nthreads", 1,
                    "--no-dashboard", "--local-directory", self.work / f"w{i}",
                )  # fmt: skip
            with distributed.Client(scheduler_file=str(file), timeout=30) as client:
                client.wait_for_workers(self.workers, timeout=60)
                client.get_task_stream()  # the scheduler records every task from now on
                self.address = client.scheduler.address
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a scheduler with two worker processes, 1 thread each."""
    with CLICluster(tmp_path_factory.mktemp("dask")) as running:
        yield running.address


def _tasks_per_worker(address: str, prefix: str, since: float) -> Counter[str]:
    with distributed.Client(address, timeout=30) as client:
        stream = client.get_task_stream(start=since)
    return Counter(t["worker"] for t in stream if str(t["key"]).startswith(prefix))


# -- parallel.imap_batches on Dask ----------------------------------------------------------------


def test_batches_run_on_both_workers_and_come_back_in_input_order(cluster):
    compute = ComputeParams(backend="dask", scheduler=cluster, batch_size=3)
    items = list(range(40))
    since = time.time()
    got = list(parallel.imap_batches(operator.mul, items, compute, 2))
    assert [batch for batch, _ in got] == parallel.batches(items, 3)
    assert [result for _, result in got] == [list(b) * 2 for b in parallel.batches(items, 3)]
    per_worker = _tasks_per_worker(cluster, "photoprep-mul-", since)
    assert sum(per_worker.values()) >= 14 and len(per_worker) == 2, per_worker


def test_an_error_on_a_worker_is_raised_as_the_same_exception(cluster):
    joblib = ComputeParams(n_jobs=2, batch_size=2)
    dask = ComputeParams(backend="dask", scheduler=cluster, batch_size=2)
    raised = []
    for compute in (joblib, dask):
        with pytest.raises(TypeError) as info:
            list(parallel.imap_batches(int, list(range(6)), compute))
        raised.append(str(info.value))
    assert raised[0] == raised[1]


def test_a_local_cluster_has_n_jobs_workers_serves_a_whole_session_and_leaves_no_process_behind(capsys):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    compute = ComputeParams(backend="dask", scheduler="local", n_jobs=2, batch_size=5)
    with parallel.session(compute):
        with parallel.dask_client(compute) as client:
            assert sorted(client.nthreads().values()) == [1, 1]
            pids = client.run(os.getpid)
            assert os.getpid() not in pids.values()
        got = [r for _, r in parallel.imap_batches(operator.mul, list(range(10)), compute, 2)]
        assert got == [[0, 1, 2, 3, 4] * 2, [5, 6, 7, 8, 9] * 2]
        with parallel.dask_client(compute) as again:
            assert again is client and again.run(os.getpid) == pids
    assert capsys.readouterr().err.count("dask: 2 workers at tcp://127.0.0.1:") == 1
    left = [
        p.cmdline()
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert left == []
    assert not any(psutil.pid_exists(pid) for pid in pids.values())


def test_workers_running_other_photoprep_code_are_refused(tmp_path):
    # The stage's own code is the reference: a worker whose photoprep differs could write other bytes.
    src = tmp_path / "src"
    shutil.copytree(
        Path(photoprep.__file__).resolve().parents[1], src, ignore=shutil.ignore_patterns("*.pyc")
    )
    with open(src / "photoprep" / "images" / "decode.py", "a", encoding="utf-8") as changed:
        changed.write("\n# another version\n")
    with CLICluster(tmp_path, workers=1, pythonpath=src) as other:
        compute = ComputeParams(backend="dask", scheduler=other.address)
        with pytest.raises(UserError, match=r"1 worker.* run other photoprep code"):
            list(parallel.imap_batches(operator.mul, [1, 2], compute, 2))


def test_the_near_search_runs_its_keys_as_tasks_on_both_workers_and_finds_what_threads_find(cluster):
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    copies = hashes[rng.integers(0, 3000, 400)].copy()
    copies[np.arange(400), rng.integers(0, 8, 400)] ^= np.uint8(1) << rng.integers(0, 8, 400).astype(np.uint8)
    hashes = np.concatenate([hashes, copies])
    others = hashes[rng.integers(0, len(hashes), 500)]
    others[:, 0] ^= np.uint8(6)  # each 2 bits from a hash
    in_threads, stats = hamming.near_duplicate_search(hashes, 4, others)
    since = time.time()
    with parallel.session(ComputeParams(backend="dask", scheduler=cluster)):
        on_dask, dask_stats = hamming.near_duplicate_search(hashes, 4, others)
    assert len(in_threads.pairs) >= 400 and len(in_threads.across) >= 500
    for name in ("unique", "inverse", "pairs", "other_unique", "other_inverse", "across"):
        assert np.array_equal(getattr(on_dask, name), getattr(in_threads, name)), name
    assert dask_stats == stats and stats.n_keys > 1
    per_worker = _tasks_per_worker(cluster, "photoprep-key_pass-", since)
    assert sum(per_worker.values()) == stats.n_keys and len(per_worker) == 2, per_worker


# -- shards through fsspec -----------------------------------------------------------------------


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _shards(directory: Path, blobs: list[bytes]) -> pd.DataFrame:
    with ShardWriter(directory, 1 << 20) as writer:
        shas = [writer.add(data) for data in blobs]
        refs = writer.flush()
    rows = [
        (directory.name, f"p{i}", refs[s].shard, refs[s].offset, refs[s].size, s) for i, s in enumerate(shas)
    ]
    return pd.DataFrame(rows, columns=["source", "id", "shard", "offset", "size", "sha256"])


def test_a_remote_reader_reads_byte_ranges_and_refuses_names_that_are_not_shards(tmp_path):
    blobs = [bytes([i]) * (1000 + i) for i in range(5)]
    table = _shards(tmp_path / "raw" / "src", blobs)
    reader = open_reader(f"file://{tmp_path / 'raw'}", "src")
    assert isinstance(reader, RemoteBlobReader)
    assert [reader.read(r.shard, r.offset, r.size) for r in table.itertuples()] == blobs
    with pytest.raises(ValueError, match="not a shard name"):
        reader.read("../../etc/passwd", 0, 10)
    with pytest.raises(ValueError, match="runs past the end"):
        reader.read(table["shard"][0], table["offset"][4], 10**6)
    with pytest.raises(UserError, match=r"shard-0{16}\.tar does not exist: mirror data/raw there"):
        reader.read("shard-0000000000000000.tar", 0, 10)
    local = open_reader(str(tmp_path / "raw"), "src")  # compute.storage as an absolute path
    assert [local.read(r.shard, r.offset, r.size) for r in table.itertuples()] == blobs
    local.close()
    with pytest.raises(ValueError, match="not a source name"):
        open_reader(f"file://{tmp_path / 'raw'}", "../raw/src")


def test_dask_workers_probe_shards_read_from_storage_as_joblib_reads_them_locally(
    cluster, tmp_path, monkeypatch
):
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache-local"))
    raw = tmp_path / "raw"
    table = _shards(raw / "src", [_jpeg(i) for i in range(6)])
    local = probe_images(table, raw, ProbeSpec(), ComputeParams(n_jobs=1, batch_size=2))
    storage = tmp_path / "bucket"
    shutil.copytree(raw, storage)
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache-dask"))
    remote = ComputeParams(backend="dask", scheduler=cluster, batch_size=2, storage=f"file://{storage}")
    # raw_dir is nowhere: the workers read only through compute.storage.
    since = time.time()
    got = probe_images(table, tmp_path / "nowhere", ProbeSpec(), remote)
    pd.testing.assert_frame_equal(got, local)
    assert sum(_tasks_per_worker(cluster, "photoprep-probe_batch-", since).values()) == 3


# -- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("scheduler", "127.0.0.1:8786", "compute.scheduler: .*tcp://host:8786"),
        ("scheduler", "http://host:8786", "compute.scheduler"),
        ("storage", "data/raw", "compute.storage: .*absolute path"),
        ("storage", "nosuchfs://bucket/raw", "compute.storage: unknown fsspec protocol"),
    ],
)
def test_bad_scheduler_or_storage_is_one_clear_line(tmp_path, key, value, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["compute"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=message):
        load(tmp_path / "params.yaml")


def test_good_scheduler_and_storage_values_load():
    for scheduler in (None, "local", "tcp://10.0.0.5:8786", "tls://sched.example:8786"):
        assert ComputeParams(backend="dask", scheduler=scheduler).scheduler == scheduler
    for storage in (None, "/mnt/shared/raw", "s3://bucket/raw", "file:///mnt/raw"):
        assert ComputeParams(storage=storage).storage == storage


# -- the stages under dvc, joblib against dask ------------------------------------------------------


def _run(cmd: list[str], cwd: Path, cache: Path) -> str:
    env = _env()
    env["PHOTOPREP_CACHE"] = str(cache)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _outs(repo: Path, stages: tuple[str, ...]) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in stages for out in lock[stage]["outs"]}


def _copy(repo: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file() and not name.startswith(("data/", "models/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (repo / "dvc.lock").unlink(missing_ok=True)


def _set_compute(repo: Path, **values: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compute"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_on_two_dask_workers_gives_the_bytes_of_joblib(cluster, tmp_path):
    repo = tmp_path / "repo"
    _copy(repo)
    stages = ("dedup", "bucket", "features")
    # A quarter of the demo's manifest (its defects included) in small batches: dozens of tasks.
    manifest = repo / "pipeline" / "sources" / "demo" / "photos.txt"
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join(lines[: len(lines) // 4]))
    _set_compute(repo, batch_size=16, n_jobs=2)
    _run(["git", "init", "-q"], repo, tmp_path / "none")
    _run(["dvc", "repro", "features"], repo, tmp_path / "cache-joblib")
    joblib = _outs(repo, stages)

    _set_compute(repo, backend="dask", scheduler=cluster)
    since = time.time()
    out = _run(["dvc", "repro", "--force", "--single-item", *stages], repo, tmp_path / "cache-dask")
    assert _outs(repo, stages) == joblib
    assert (
        out.count("dask: 2 workers at tcp://127.0.0.1:") == 3
    )  # dedup (probe and thumbnails), bucket, features
    for prefix in ("probe_batch", "pixels_batch", "features_of_pixels"):
        per_worker = _tasks_per_worker(cluster, f"photoprep-{prefix}-", since)
        assert len(per_worker) == 2 and min(per_worker.values()) >= 3, (prefix, per_worker)
    decodes = [
        yaml.safe_load(line) for line in (tmp_path / "cache-dask" / "decodes.jsonl").read_text().splitlines()
    ]
    assert {d["stage"]: d["cached"] for d in decodes}.get("probe") == 0  # the dask run decoded afresh


def test_every_stage_that_runs_batches_declares_no_compute_param():
    # compute.* changes where the work runs, never what it writes: no stage re-runs for it.
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("dedup", "bucket", "features"):
        assert not any(str(p).startswith("compute") for p in declared[stage].get("params", []))


def test_download_partitions_run_as_tasks_on_both_workers_with_the_bytes_of_joblib(cluster, cdn, tmp_path):
    from photoprep.core.params import DownloadParams
    from photoprep.ingest import partitions

    ids = [f"d{i:03d}" for i in range(40)]
    for id_ in ids:
        cdn.add(id_, _jpeg(int(id_[1:])))
    recs = pd.DataFrame({"source": "demo", "id": ids, "url": [cdn.url(i) for i in ids]})
    p = DownloadParams(
        concurrency=8, per_host=8, read_timeout=2.0, retries=2, backoff_base=0.01, partitions=4
    )
    since = time.time()
    for name, compute in [
        ("joblib", ComputeParams(n_jobs=2)),
        ("dask", ComputeParams(backend="dask", scheduler=cluster)),
    ]:
        place = Place(tmp_path / name, tmp_path, tmp_path / f"{name}.parquet")
        result = partitions.download(recs, place, p, compute)
        assert (result.table["status"] == "ok").all()
    assert (tmp_path / "joblib.parquet").read_bytes() == (tmp_path / "dask.parquet").read_bytes()
    shards = sorted(p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("shard-*.tar"))
    assert shards == sorted(
        p.relative_to(tmp_path / "joblib") for p in (tmp_path / "joblib").rglob("shard-*.tar")
    )
    per_worker = _tasks_per_worker(cluster, "photoprep-fetch_partitions-", since)
    assert sum(per_worker.values()) == 4 and len(per_worker) == 2, per_worker
