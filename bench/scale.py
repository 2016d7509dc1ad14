"""Scale benchmark: the data stages at N photos and at N + 1%, and the download beside img2dataset.

Generates a synthetic source in the `heobs` format (never the demo): N photo-like JPEGs in six
resolutions, 2% planted near duplicates (an earlier photo, brightened and re-encoded), 1%
truncated files, one in ten ids listed in a second language, and a labels.csv. Then, in a fresh
project per size, it runs each data stage as `python stages/<stage>.py` (no DVC) and prints per
stage:

- wall and CPU seconds (CPU of the stage's whole process tree: its rusage once it is reaped,
  never less than the sum of what sampling /proc saw);
- peak heap: the largest sum over the process tree of RssAnon (anonymous resident memory,
  /proc/<pid>/status), sampled every 20 ms; memory-mapped files and the page cache do not count;
- heap growth per photo between the smallest and the largest size (with --repeats K, each stage
  runs K times from scratch at each size, its outputs removed and its memos empty, and the peak heap
  is the median of the K: one run's peak moves by a few MB with the timing of its threads);
- after adding 1% photos to the largest size: each stage's re-run CPU as a fraction of its full
  run's, against the target "2 s + 10% of the full run";
- the start of each stage (a fresh interpreter importing the stage script) and whether it
  imported torch;
- a projection of CPU and peak heap to 144,564 and 1,000,000 photos (linear in N, from the two
  largest sizes; CPU rather than wall, because wall on a shared machine measures the others'
  load: an idle machine's wall is about CPU / compute.n_jobs for dedup, bucket and features).

Then the download side by side: the first --download-n photos served by a loopback server that
holds every response 50 ms (bench/download.py's servers, in their own process), page cache
warmed first, fetched by photoprep's download stage (default params: 64 in flight) and by
img2dataset (--img2dataset-processes x --img2dataset-threads, no resizing, no re-encoding).
img2dataset pins pandas < 3, so it lives in its own virtual environment: pass its executable
with --img2dataset (default: `img2dataset` on PATH); without it that row is skipped.

    python bench/scale.py --sizes 2000,10000                    # a table on stdout
    python bench/scale.py --sizes 2000,20000 --json             # one JSON object of the figures
    python bench/scale.py --sizes 2000,20000 --download-n 0 --repeats 3 --json   # heap: medians of 3
    python bench/scale.py --sizes 500 --download-n 500 --img2dataset /opt/i2d/bin/img2dataset
    python bench/scale.py --backends --sizes 2000 --json        # joblib against Dask, images/s per stage
    python bench/scale.py --download-only --download-n 20000 --repeats 3   # the download alone
    python bench/scale.py --download-only --download-n 20000 --server nginx  # served by nginx

With --backends it runs only dedup, bucket and features at the largest size, with joblib, with
``compute.backend: dask`` on a LocalCluster each stage starts (--n-jobs processes, 1 thread each),
and on a running cluster (a `dask scheduler` and --n-jobs `dask worker` processes on 127.0.0.1,
started before the clock), each on an empty memo; it prints each stage's throughput (images /
wall s of the whole stage), the ratio to joblib, and whether the outputs are byte-identical.

With ``--disk`` it measures the disk of an increment under DVC instead (bench/scale_disk.py): what
`dvc repro` of the data stages adds to `.dvc/cache` when 1 % photos join the largest size, with
chunked arrays (the default) against one file per array.

    python bench/scale.py --disk --sizes 10000                  # +1 % of 10,000: cache and disk added

With ``--tables`` it runs only the table steps (dedup's grouping and keep rule, validate, bucket
assignment, split) on synthetic probe rows, a fresh process per size (bench/scale_tables.py):
wall and peak heap per step.

    python bench/scale.py --tables --table-sizes 100000,1000000

With ``--tables-in-file`` the rows live in a Parquet file, made a million at a time, and the
table steps that stream (dedup's grouping and keep rule in partitions, validate, bucket's two
passes: sizes counted, then kept rows written) read it a slice at a time, once per
``--memory-mb``: wall, the process's peak heap, and the outputs' sha256, which must not depend
on the memory param.

    python bench/scale.py --tables-in-file --table-sizes 10000000 --memory-mb 4096,2048

``--tables-backends joblib,dask`` runs them once more per memory param with dedup in a session of
a LocalCluster of two workers, where the near search's keys are Dask tasks; the outputs' sha256
must not depend on the backend either.

``--set compute.memory_mb=16`` sets a param of every project the bench makes (repeatable).

With ``--train`` it measures training instead (bench/scale_train.py): train images/s of one
process with ``--train-threads`` threads against ``--train-nproc`` DDP ranks (gloo) sharing them.

    python bench/scale.py --train                               # 1 process x 2 threads vs 2 ranks x 1
    python bench/scale.py --train --train-epochs 2 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import (  # noqa: E402  (bench/download.py)
    ECHO_MODULE,
    LATENCY_S,
    Server,
    check_server,
    start_nginx,
    start_python_server,
)
from scale_disk import disk_of_an_increment, print_disk  # noqa: E402  (bench/scale_disk.py)
from scale_tables import (  # noqa: E402  (bench/scale_tables.py)
    print_in_file,
    print_tables,
    table_steps,
    tables_in_file,
)
from scale_train import print_train, train_scaling  # noqa: E402  (bench/scale_train.py)

from photoprep.core.layout import PATHS  # noqa: E402

RESOLUTIONS = [(320, 240), (240, 320), (400, 300), (200, 150), (256, 256), (480, 360)]  # width, height
DATA_STAGES = ["download", "dedup", "validate", "bucket", "features", "split"]
PROJECTIONS = (144_564, 1_000_000)
NEAR_SHARE, TRUNCATED_SHARE, SECOND_LANGUAGE_SHARE = 0.02, 0.01, 0.1
SOURCE = "syn"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the synthetic source ----------------------------------------------------------------------


def photo_id(i: int) -> str:
    return f"syn-{i:07d}"


def _pixels(i: int, seed: int) -> np.ndarray:
    """Photo i: smooth random structure (an upsampled 6x8 grid), a gradient, grain; one of 6 sizes."""
    rng = np.random.default_rng([seed, i])
    w, h = RESOLUTIONS[int(rng.integers(len(RESOLUTIONS)))]
    grid = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    ramp = np.linspace(-30, 30, w, dtype=np.float32)[None, :, None] * rng.uniform(-1, 1)
    grain = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(smooth + ramp + grain, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def photo_bytes(i: int, seed: int) -> tuple[bytes, str]:
    """The file of photo i and what it is: 'photo', 'near' (of an earlier photo) or 'truncated'."""
    rng = np.random.default_rng([seed, i, 1])
    draw = rng.random()
    if i > 0 and draw < NEAR_SHARE:
        original = _pixels(int(rng.integers(i)), seed)
        brighter = np.clip(original.astype(np.int16) + 4, 0, 255).astype(np.uint8)
        return _jpeg(brighter, 80), "near"
    data = _jpeg(_pixels(i, seed), 90)
    if draw < NEAR_SHARE + TRUNCATED_SHARE:
        return data[: len(data) * 3 // 5], "truncated"
    return data, "photo"


def write_photos(source: Path, start: int, count: int, seed: int) -> dict[str, int]:
    """Add photos start .. start+count-1 to the source (files, manifest lines, labels)."""
    kinds = {"photo": 0, "near": 0, "truncated": 0}
    (source / "cdn").mkdir(parents=True, exist_ok=True)
    lines, labels = [], []
    numbers = range(start, start + count)
    # Made in worker processes when there are many (each photo from its own seed: the same bytes).
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) if count >= 5000 else nullcontext() as pool:
        made = (
            pool.map(photo_bytes, numbers, itertools.repeat(seed), chunksize=256)
            if pool
            else (photo_bytes(i, seed) for i in numbers)
        )
        for i, (data, kind) in zip(numbers, made, strict=True):
            kinds[kind] += 1
            (source / "cdn" / photo_id(i)).write_bytes(data)
            lines.append(f"{photo_id(i)} | Photo {i} | eng\n")
            if (i * 7919) % 100 < SECOND_LANGUAGE_SHARE * 100:
                lines.append(f"{photo_id(i)} | Foto {i} | deu\n")
            labels.append(f"{photo_id(i)},c{i % 10}\n")
    with open(source / "photos.txt", "a", encoding="utf-8") as manifest:
        manifest.writelines(lines)
    first = not (source / "labels.csv").exists()
    with open(source / "labels.csv", "a", encoding="utf-8") as out:
        out.writelines((["id,label\n"] if first else []) + labels)
    return kinds


PARAMS_SET: dict[str, object] = {}  # --set: params of every project made (e.g. compute.memory_mb)
SERVER = ["python"]  # --server: who serves the side-by-side download


def make_project(root: Path, url: str, n_jobs: int) -> Path:
    """A project: the stage scripts, default params with one source, an empty source folder."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "stages", root / "stages")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sources"] = [SOURCE]
    params["compute"]["n_jobs"] = n_jobs
    for key, value in PARAMS_SET.items():  # --set section.key=value
        section, name = key.split(".", 1)
        params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    source = root / "pipeline" / "sources" / SOURCE
    source.mkdir(parents=True)
    (source / "source.yaml").write_text(
        f'format: heobs\nmanifest: photos.txt\nurl: "{url}"\nlabels: labels.csv\n'
    )
    return root


# -- measuring a process tree ------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_heap_mb: float  # the process tree's: the stage's process and its workers
    own_heap_mb: float = 0.0  # the stage's process alone: a worker start shows apart from a growth


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.pop("PHOTOPREP_CACHE", None)
    env["TQDM_DISABLE"] = "1"
    return env


def measure(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run `command`; wall, CPU of its process tree and its peak anonymous memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=cwd, env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak_kb, own_kb, cpu_seen, done = 0, 0, {}, threading.Event()

    def sample() -> None:
        nonlocal peak_kb, own_kb
        root = psutil.Process(child.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for proc in tree:
                kb = _rss_anon_kb(proc.pid)
                total += kb
                if proc.pid == child.pid:
                    own_kb = max(own_kb, kb)
                try:
                    times = proc.cpu_times()
                    cpu_seen[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass
            peak_kb = max(peak_kb, total)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = child.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{stderr.decode()[-3000:]}")
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu = round(max(reaped, sum(cpu_seen.values())), 3)
    return Run(round(wall, 3), cpu, round(peak_kb / 1024, 1), round(own_kb / 1024, 1))


def run_stage(project: Path, stage: str, env: dict[str, str] | None = None) -> Run:
    args = [SOURCE] if stage == "download" else []
    return measure([sys.executable, f"stages/{stage}.py", *args], project, env)


def stage_start(project: Path, stage: str) -> dict:
    """CPU seconds (best of 3) of a fresh interpreter that imports the stage script, not running it;
    and whether that import loaded torch."""
    code = (
        "import importlib.util, sys\n"
        "sys.path.insert(0, 'stages')\n"
        f"spec = importlib.util.spec_from_file_location('stage', 'stages/{stage}.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print('torch' in sys.modules)\n"
    )
    cpus = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=project, env=_env(), capture_output=True, text=True
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode:
            raise RuntimeError(f"importing stages/{stage}.py failed: {out.stderr.strip().splitlines()[-1:]}")
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"start_s": round(min(cpus), 3), "imports_torch": out.stdout.strip() == "True"}


# -- the data stages ---------------------------------------------------------------------------


# What each data stage writes (the layout's paths): removed before it runs again from scratch.
OUTPUTS = {
    "download": [PATHS.raw_table(SOURCE), PATHS.shards_dir(SOURCE)],
    "dedup": [PATHS.dedup_table],
    "validate": [PATHS.valid_table],
    "bucket": [PATHS.images_array, PATHS.images_table],
    "features": [PATHS.features_array, PATHS.features_table],
    "split": [PATHS.splits_dir],
}


def from_scratch(project: Path, stage: str, cache: Path) -> Run:
    """`stage` run again with its outputs removed first (its inputs stay) and its memos in
    `cache` (``PHOTOPREP_CACHE``), a folder that holds none of them yet."""
    for relative in OUTPUTS[stage]:
        path = project / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    env = _env()
    env["PHOTOPREP_CACHE"] = str(cache)
    return run_stage(project, stage, env)


def median_heap(runs: list[Run]) -> Run:
    """The first run's wall and CPU, with the median peak heaps of all of `runs`."""
    first = runs[0]
    tree = statistics.median(r.peak_heap_mb for r in runs)
    own = statistics.median(r.own_heap_mb for r in runs)
    return Run(first.wall_s, first.cpu_s, round(tree, 1), round(own, 1))


def data_stages(work: Path, sizes: list[int], seed: int, n_jobs: int, repeats: int = 1) -> dict:
    runs: dict[int, dict[str, Run]] = {}
    peaks: dict[int, dict[str, list[float]]] = {}
    kinds: dict[int, dict[str, int]] = {}
    for n in sizes:
        project = make_project(work / f"n{n}", "cdn/{id}", n_jobs)
        log(f"size {n}: writing the source ...")
        kinds[n] = write_photos(project / "pipeline" / "sources" / SOURCE, 0, n, seed)
        every: dict[str, list[Run]] = {}
        for stage in DATA_STAGES:
            every[stage] = [run_stage(project, stage)]
            log(f"  {stage:9s} {every[stage][0]}")
        for repeat in range(1, repeats):
            log(f"size {n}: each stage again from scratch ({repeat + 1} of {repeats})")
            cache = work / f"cache-n{n}-{repeat}"  # each memo empty: its stage computes it all
            for stage in DATA_STAGES:
                every[stage].append(from_scratch(project, stage, cache))
                log(f"  {stage:9s} {every[stage][-1]}")
            shutil.rmtree(cache, ignore_errors=True)
        runs[n] = {stage: median_heap(done) for stage, done in every.items()}
        peaks[n] = {stage: [r.peak_heap_mb for r in done] for stage, done in every.items()}
    largest = max(sizes)
    project = work / f"n{largest}"
    added = max(1, largest // 100)
    write_photos(project / "pipeline" / "sources" / SOURCE, largest, added, seed)
    log(f"size {largest} + {added}: re-run")
    rerun = {}
    for stage in DATA_STAGES:
        rerun[stage] = run_stage(project, stage)
        log(f"  {stage:9s} {rerun[stage]}")
    decodes = [
        json.loads(line) for line in (project / ".photoprep/cache/decodes.jsonl").read_text().splitlines()
    ]
    starts = {stage: stage_start(project, stage) for stage in DATA_STAGES}
    return {
        "sizes": sizes,
        "source": {str(n): k for n, k in kinds.items()},
        "runs": {str(n): {s: asdict(r) for s, r in per.items()} for n, per in runs.items()},
        "repeats": repeats,
        "peak_heap_mb_runs": {str(n): per for n, per in peaks.items()},
        "added": added,
        "rerun": {s: asdict(r) for s, r in rerun.items()},
        "rerun_decodes": decodes[-4:],
        "starts": starts,
    }


def summarise(result: dict) -> dict:
    sizes = result["sizes"]
    small, large = min(sizes), max(sizes)
    below = sorted(sizes)[-2] if len(sizes) > 1 else None
    summary = {}
    for stage in DATA_STAGES:
        full = result["runs"][str(large)][stage]
        again = result["rerun"][stage]
        row = {
            "wall_s": full["wall_s"],
            "cpu_s": full["cpu_s"],
            "cpu_ms_per_photo": round(1000 * full["cpu_s"] / large, 3),
            "peak_heap_mb": full["peak_heap_mb"],
            "rerun_cpu_s": again["cpu_s"],
            "rerun_fraction": round(again["cpu_s"] / full["cpu_s"], 3) if full["cpu_s"] else None,
            "rerun_within_target": again["cpu_s"] <= 2.0 + 0.1 * full["cpu_s"],
            **result["starts"][stage],
        }
        if below is not None:
            low = result["runs"][str(small)][stage]
            row["heap_kb_per_photo"] = round(
                (full["peak_heap_mb"] - low["peak_heap_mb"]) * 1024 / (large - small), 3
            )
            if "own_heap_mb" in full and "own_heap_mb" in low:  # reports before it lack it
                row["own_heap_kb_per_photo"] = round(
                    (full["own_heap_mb"] - low["own_heap_mb"]) * 1024 / (large - small), 3
                )
            prev = result["runs"][str(below)][stage]
            slope_cpu = max(0.0, (full["cpu_s"] - prev["cpu_s"]) / (large - below))
            slope_heap = max(0.0, (full["peak_heap_mb"] - prev["peak_heap_mb"]) / (large - below))
            row["projection"] = {
                str(n): {
                    "cpu_s": round(full["cpu_s"] + slope_cpu * (n - large), 1),
                    "peak_heap_mb": round(full["peak_heap_mb"] + slope_heap * (n - large), 1),
                }
                for n in PROJECTIONS
            }
        summary[stage] = row
    return summary


# -- joblib against Dask, per stage ------------------------------------------------------------

BATCH_STAGES = ["dedup", "bucket", "features"]  # the stages whose per-image work runs in batches


def _stage_images(project: Path, stage: str) -> int:
    """How many images the stage's per-image work receives."""
    if stage == "dedup":
        table = pd.read_parquet(project / "data" / "raw" / f"{SOURCE}.parquet", columns=["status"])
        return int((table["status"] == "ok").sum())
    table = "data/interim/valid.parquet" if stage == "bucket" else "data/processed/images.parquet"
    return len(pd.read_parquet(project / table, columns=["id"]))


def _outputs_digest(project: Path) -> str:
    digest = hashlib.sha256()
    for name in ("data/interim/dedup.parquet", "data/processed/images", "data/features/features"):
        path = project / name
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:  # a chunked array: every file
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


BACKENDS = {
    "joblib": "joblib, n_jobs processes",
    "dask-local": "Dask, a LocalCluster of n_jobs processes started by each stage",
    "dask-cluster": "Dask, a running scheduler with n_jobs `dask worker` processes",
}


def _set_backend(project: Path, backend: str, scheduler: str | None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"]["backend"] = "joblib" if backend == "joblib" else "dask"
    params["compute"]["scheduler"] = scheduler
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class DaskCluster:
    """`dask scheduler` and `workers` `dask worker` processes (1 thread each) on 127.0.0.1."""

    def __init__(self, work: Path, workers: int):
        self.work, self.workers, self.procs = work, workers, []
        self.address = ""

    def _start(self, *args: object) -> None:
        command = [str(Path(sys.executable).parent / "dask"), *map(str, args)]
        self.procs.append(
            subprocess.Popen(
                command, cwd=self.work, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    def __enter__(self) -> DaskCluster:
        from distributed import Client

        self.work.mkdir(parents=True, exist_ok=True)
        file = self.work / "scheduler.json"
        try:
            self._start(
                "scheduler", "--host", "127.0.0.1", "--port", 0, "--no-dashboard", "--scheduler-file", file
            )
            for _ in range(600):
                if file.exists():
                    break
                time.sleep(0.1)
            for _ in range(self.workers):
                self._start(
                    "worker", "--no-nanny", "--nthreads", 1, "--no-dashboard", "--scheduler-file", file,
                    "--local-directory", self.work / "scratch",
                )  # fmt: skip
            with Client(scheduler_file=str(file), timeout=60) as client:
                client.wait_for_workers(self.workers, timeout=120)
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
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def backends_side_by_side(work: Path, n: int, seed: int, n_jobs: int, repeats: int) -> dict:
    """dedup, bucket and features at N photos with joblib, with a Dask LocalCluster and on a
    running Dask cluster, each run on an empty memo; throughput in images/s of each stage's wall.

    The stages' wall and CPU include everything each stage does (reading tables, writing
    outputs, a LocalCluster's start); the running cluster's processes are started before the
    clock and their CPU is not counted (only the stage's process tree is measured)."""
    project = make_project(work / f"backends-n{n}", "cdn/{id}", n_jobs)
    log(f"backends at {n}: writing the source ...")
    write_photos(project / "pipeline" / "sources" / SOURCE, 0, n, seed)
    run_stage(project, "download")
    runs: dict[str, dict[str, list[Run]]] = {b: {s: [] for s in BATCH_STAGES} for b in BACKENDS}
    digests: dict[str, str] = {}
    with DaskCluster(work / "dask", n_jobs) as cluster:
        for repeat in range(repeats):
            for backend in BACKENDS:
                scheduler = {"joblib": None, "dask-local": "local", "dask-cluster": cluster.address}[backend]
                _set_backend(project, backend, scheduler)
                env = _env()
                env["PHOTOPREP_CACHE"] = str(work / f"cache-{backend}-{repeat}")  # nothing memoized yet
                for stage in ["dedup", "validate", "bucket", "features"]:
                    run = measure([sys.executable, f"stages/{stage}.py"], project, env)
                    if stage in BATCH_STAGES:
                        runs[backend][stage].append(run)
                        log(f"  {backend:12s} {stage:9s} {run}")
                digests[backend] = _outputs_digest(project)
    images = {stage: _stage_images(project, stage) for stage in BATCH_STAGES}
    out: dict = {"n": n, "workers": n_jobs, "repeats": repeats, "images": images, "backends": BACKENDS}
    for backend, per in runs.items():
        out[backend] = {}
        for stage, measured in per.items():
            wall = float(np.median([r.wall_s for r in measured]))
            out[backend][stage] = {
                "wall_s": round(wall, 3),
                "cpu_s": round(float(np.median([r.cpu_s for r in measured])), 3),
                "images_per_s": round(images[stage] / wall, 1),
            }
    out["over_joblib"] = {
        backend: {
            stage: round(out[backend][stage]["images_per_s"] / out["joblib"][stage]["images_per_s"], 3)
            for stage in BATCH_STAGES
        }
        for backend in BACKENDS
        if backend != "joblib"
    }
    out["same_bytes"] = len(set(digests.values())) == 1
    return out


def print_backends(report: dict) -> None:
    b = report["backends"]
    print(f"machine: {report['machine']}")
    print(
        f"{b['n']} photos, {b['workers']} workers, median of {b['repeats']}; "
        f"outputs byte-identical across backends: {b['same_bytes']}"
    )
    for backend, what in BACKENDS.items():
        print(f"  {backend}: {what}")
    print(f"{'stage':9s} {'images':>7s} " + " ".join(f"{name + ' img/s':>18s}" for name in BACKENDS))
    for stage in BATCH_STAGES:
        cells = []
        for backend in BACKENDS:
            rate = b[backend][stage]["images_per_s"]
            ratio = "" if backend == "joblib" else f" ({b['over_joblib'][backend][stage]:.2f}x)"
            cells.append(f"{f'{rate:.1f}{ratio}':>18s}")
        print(f"{stage:9s} {b['images'][stage]:7d} " + " ".join(cells))


# -- the download, side by side ------------------------------------------------------------------


def _start_server(served: Path, work: Path) -> Server:
    """The loopback CDN of the download (--server): bench/download.py's asyncio server in its own
    process (the default, the server of every earlier run), or nginx with its echo module, which
    takes less of the two cores from the client."""
    if SERVER[0] == "python":
        return start_python_server(served)
    if not (shutil.which("nginx") and ECHO_MODULE.exists()):
        raise SystemExit("--server nginx: install nginx and libnginx-mod-http-echo (apt-get) first")
    (work / "nginx").mkdir()
    return start_nginx(served, work / "nginx")


def download_side_by_side(
    work: Path, source: Path, n: int, img2dataset: str | None, procs: int, threads: int, repeats: int = 1
) -> dict:
    served = work / "served"
    (served / "photo").mkdir(parents=True)
    ids = [photo_id(i) for i in range(n)]
    for id_ in ids:
        os.link(source / "cdn" / id_, served / "photo" / id_)
    for id_ in ids:  # warm the page cache, so that neither tool pays for the disk
        (served / "photo" / id_).read_bytes()
    server = _start_server(served, work)
    try:
        check_server(server, served, ids[0])
        out: dict = {"n": n, "server": server.name, "latency_ms": LATENCY_S * 1000}
        out["latency_floor_s"] = round(n / 64 * LATENCY_S, 2)
        runs = []
        for repeat in range(repeats):  # each run in a fresh project: nothing to resume
            project = make_project(work / f"download-{repeat}", server.latency_template, 1)
            sub = project / "pipeline" / "sources" / SOURCE
            (sub / "photos.txt").write_text("".join(f"{id_} | Photo | eng\n" for id_ in ids))
            (sub / "labels.csv").write_text("id,label\n")
            runs.append(run_stage(project, "download"))
            log(f"  photoprep download run {repeat + 1}: {runs[-1]}")
        run = sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]  # the median run (lower middle)
        table = pd.read_parquet(project / "data" / "raw" / f"{SOURCE}.parquet")
        out["photoprep"] = {**asdict(run), "ok": int((table["status"] == "ok").sum()), "in_flight": 64}
        out["photoprep"]["wall_s_runs"] = [r.wall_s for r in runs]
        log(f"  photoprep download {out['photoprep']}")
        found = shutil.which(img2dataset) if img2dataset else None
        if found:
            urls = work / "urls.txt"
            urls.write_text("".join(server.latency_template.format(id=id_) + "\n" for id_ in ids))
            target = work / "i2d"
            command = [
                found,
                "--url_list", str(urls),
                "--input_format", "txt",
                "--output_folder", str(target),
                "--output_format", "files",
                "--processes_count", str(procs),
                "--thread_count", str(threads),
                "--resize_mode", "no",
                "--disable_all_reencoding", "True",
                "--timeout", "30",
                "--retries", "0",
                "--enable_wandb", "False",
            ]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            try:
                run = measure(command, work, env)
            except RuntimeError as exc:
                out["img2dataset_error"] = str(exc)[-2000:]
                return out
            stats = [json.loads(p.read_text()) for p in target.glob("*_stats.json")]
            ok = sum(s.get("successes", 0) for s in stats)
            out["img2dataset"] = {**asdict(run), "ok": ok, "processes": procs, "threads": threads}
            log(f"  img2dataset        {out['img2dataset']}")
            out["speedup"] = round(out["img2dataset"]["wall_s"] / out["photoprep"]["wall_s"], 2)
            out["cpu_ratio"] = round(out["photoprep"]["cpu_s"] / out["img2dataset"]["cpu_s"], 2)
        return out
    finally:
        server.stop()


# -- output ----------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_1min_at_end": round(os.getloadavg()[0], 2),
    }


def print_table(report: dict) -> None:
    sizes = report["data"]["sizes"]
    large = max(sizes)
    print(f"machine: {report['machine']}")
    data = report["data"]
    print(f"source at {large}: {data['source'][str(large)]}; re-run after adding {data['added']}")
    header = (
        f"{'stage':9s} {'wall s':>7s} {'CPU s':>7s} {'ms/photo':>8s} {'heap MB':>8s} {'KB/photo':>8s} "
        f"{'own KB':>6s} "
        f"{'rerun s':>7s} {'rerun/full':>10s} {'target':>6s} {'start CPU s':>11s} {'torch':>5s}"
    )
    print(header)
    for stage, row in report["summary"].items():
        print(
            f"{stage:9s} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} {row['cpu_ms_per_photo']:8.3f} "
            f"{row['peak_heap_mb']:8.1f} {row.get('heap_kb_per_photo', float('nan')):8.2f} "
            f"{row.get('own_heap_kb_per_photo', float('nan')):6.2f} "
            f"{row['rerun_cpu_s']:7.2f} {row['rerun_fraction'] or 0:10.3f} "
            f"{'ok' if row['rerun_within_target'] else 'MISS':>6s} {row['start_s']:11.2f} "
            f"{'yes' if row['imports_torch'] else 'no':>5s}"
        )
    total_full = sum(r["cpu_s"] for r in report["summary"].values())
    total_rerun = sum(r["rerun_cpu_s"] for r in report["summary"].values())
    share = total_rerun / total_full
    print(f"all data stages: full {total_full:.1f} CPU s, re-run {total_rerun:.1f} CPU s ({share:.1%})")
    if any("projection" in r for r in report["summary"].values()):
        print("projection (linear in N from the two largest sizes): CPU s / peak heap MB")
        for n in PROJECTIONS:
            cells = []
            for stage, row in report["summary"].items():
                at = row["projection"][str(n)]
                cells.append(f"{stage} {at['cpu_s']:.0f}s/{at['peak_heap_mb']:.0f}MB")
            print(f"  {n:>9,d}: " + ", ".join(cells))
    if report.get("download"):
        print_download(report["download"])


def print_download(dl: dict) -> None:
    print(f"download of {dl['n']} photos, {dl['latency_ms']:.0f} ms latency ({dl['server']}):")
    for tool in ("photoprep", "img2dataset"):
        if tool in dl:
            r = dl[tool]
            print(f"  {tool:11s} {r['wall_s']:7.2f} s wall {r['cpu_s']:7.2f} CPU s  ok {r['ok']}")
    runs = dl["photoprep"].get("wall_s_runs", [])
    if len(runs) > 1:
        print(f"  photoprep's runs (median above): {', '.join(f'{w:.2f}' for w in runs)} s")
    if "speedup" in dl:
        print(f"  photoprep is {dl['speedup']}x img2dataset's speed at {dl['cpu_ratio']}x its CPU")
    ratio = dl["photoprep"]["wall_s"] / dl["latency_floor_s"]
    print(f"  latency floor at 64 in flight: {dl['latency_floor_s']} s (photoprep at {ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000", help="comma-separated N (default 2000,10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=2, help="compute.n_jobs of the stages")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a param of the projects (repeatable)",
    )
    parser.add_argument(
        "--download-n", type=int, default=2000, help="photos of the side-by-side download; 0: skip"
    )
    parser.add_argument(
        "--server",
        choices=["python", "nginx"],
        default="python",
        help="the download's loopback CDN: bench/download.py's asyncio server or nginx + echo_sleep",
    )
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="img2dataset's executable")
    parser.add_argument("--img2dataset-processes", type=int, default=2)
    parser.add_argument("--img2dataset-threads", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--backends",
        action="store_true",
        help="only dedup, bucket, features at the largest size: joblib against Dask (LocalCluster), images/s",
    )
    parser.add_argument(
        "--disk",
        action="store_true",
        help="only the disk of a +1 %% increment under DVC at the largest size: chunked against one file",
    )
    parser.add_argument(
        "--tables", action="store_true", help="only the table steps, on synthetic probe rows (--table-sizes)"
    )
    parser.add_argument(
        "--download-only",
        action="store_true",
        help="only the side-by-side download of --download-n photos (median of --repeats photoprep runs)",
    )
    parser.add_argument("--table-sizes", default="100000,1000000", help="rows of --tables (comma-separated)")
    parser.add_argument(
        "--tables-in-file",
        action="store_true",
        help="only the streamed table steps over rows in a Parquet file (the largest --table-sizes)",
    )
    parser.add_argument(
        "--memory-mb", default="4096", help="memory params of --tables-in-file (comma-separated)"
    )
    parser.add_argument(
        "--tables-backends",
        default="joblib",
        help="backends of --tables-in-file (joblib,dask: dedup also in a session of a 2-worker LocalCluster)",
    )
    parser.add_argument("--train", action="store_true", help="training throughput, 1 process vs DDP ranks")
    parser.add_argument("--train-n", type=int, default=2000, help="photos of the training dataset")
    parser.add_argument("--train-nproc", type=int, default=2, help="DDP ranks (train.nproc)")
    parser.add_argument("--train-threads", type=int, default=2, help="compute.threads of both runs")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-model", default="convnet")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each, median shown (--backends: 1, --train: 3; the data stages' peak heap: 1)",
    )
    args = parser.parse_args()
    SERVER[0] = args.server
    for item in args.set:
        key, _, value = item.partition("=")
        PARAMS_SET[key] = yaml.safe_load(value)
    if args.repeats is None:
        args.repeats = 3 if args.train else 1
    if args.train:
        train_main(args)
        return
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    # One mode, one key of the report: (flag, what measures it, what prints it).
    modes: list[tuple[bool, str, Callable[[Path], dict], Callable[[dict], None]]] = [
        (
            args.tables,
            "tables",
            lambda work: table_steps([int(s) for s in args.table_sizes.split(",")], args.seed, _env()),
            print_tables,
        ),
        (
            args.tables_in_file,
            "tables_in_file",
            lambda work: tables_in_file(
                max(int(s) for s in args.table_sizes.split(",")),
                args.seed,
                [int(m) for m in args.memory_mb.split(",")],
                work / "tables",
                _env(),
                tuple(args.tables_backends.split(",")),
            ),
            print_in_file,
        ),
        (
            args.disk,
            "disk",
            lambda work: disk_of_an_increment(
                work, max(sizes), args.seed, args.n_jobs, _env(), make_project, write_photos
            ),
            print_disk,
        ),
    ]
    for chosen, key, figures_of, printer in modes:
        if chosen:
            run_and_print(
                args,
                f"photoprep-scale-{key}-",
                lambda work, key=key, figures_of=figures_of: {key: figures_of(work)},
                lambda figures, key=key, printer=printer: (
                    print(f"machine: {figures['machine']}"),
                    printer(figures[key]),
                ),
            )
            return
    if args.download_only:
        run_and_print(
            args,
            "photoprep-scale-download-",
            lambda work: {"download": download_alone(work, args)},
            lambda figures: (print(f"machine: {figures['machine']}"), print_download(figures["download"])),
        )
        return
    if args.backends:
        run_and_print(
            args,
            "photoprep-scale-",
            lambda work: {
                "backends": backends_side_by_side(work, max(sizes), args.seed, args.n_jobs, args.repeats)
            },
            print_backends,
        )
        return

    def data_and_download(work: Path) -> dict:
        data = data_stages(work, sizes, args.seed, args.n_jobs, args.repeats or 1)
        out: dict = {"data": data, "summary": summarise(data)}
        if args.download_n:
            source = work / f"n{max(sizes)}" / "pipeline" / "sources" / SOURCE
            n = min(args.download_n, max(sizes))
            out["download"] = download_side_by_side(
                work, source, n, args.img2dataset, args.img2dataset_processes, args.img2dataset_threads
            )
        return out

    run_and_print(args, "photoprep-scale-", data_and_download, print_table)


def download_alone(work: Path, args: argparse.Namespace) -> dict:
    """The download side by side without the data stages: a source of --download-n photos first."""
    source = work / "source"
    log(f"download of {args.download_n}: writing the source ...")
    write_photos(source, 0, args.download_n, args.seed)
    return download_side_by_side(
        work,
        source,
        args.download_n,
        args.img2dataset,
        args.img2dataset_processes,
        args.img2dataset_threads,
        args.repeats,
    )


def run_and_print(
    args: argparse.Namespace, prefix: str, measure: Callable[[Path], dict], printer: Callable[[dict], None]
) -> None:
    """Run `measure` in a work folder (--keep, or a temporary one removed after), add the machine,
    and print the report: one JSON object with --json, else `printer`'s table."""
    work = args.keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = measure(work)
        figures["machine"] = machine()
        if PARAMS_SET:
            figures["params_set"] = dict(PARAMS_SET)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        printer(figures)


def train_main(args: argparse.Namespace) -> None:
    def measure(work: Path) -> dict:
        return {
            "train": train_scaling(
                work,
                _env(),
                args.train_n,
                args.train_nproc,
                args.train_threads,
                args.train_epochs,
                args.train_model,
                args.repeats,
            )
        }

    def printer(figures: dict) -> None:
        print(f"machine: {figures['machine']}")
        print_train(figures["train"])

    run_and_print(args, "photoprep-scale-train-", measure, printer)


if __name__ == "__main__":
    main()
