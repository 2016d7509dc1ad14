"""Disk of an increment: what `dvc repro` of the data stages adds to `.dvc/cache` (and to disk) when
1 % photos join N, chunked arrays against one file per array.

For each layout it makes a DVC project (this repo's dvc.yaml, stages, src and .dvc/config, a
synthetic heobs source of N photos from bench/scale.py), runs `dvc repro` of the data stages
(download to split, and features), adds 1 % photos and runs it again. It prints, per layout:

- the size of `.dvc/cache` after the first run (bytes of distinct files);
- the bytes the re-run added to `.dvc/cache` (files that were not there), and that as a share of
  the first size: the issue's target is at most 5 %;
- the bytes of new files on the whole disk of the project (data/, .dvc/cache and the memos;
  a hard-linked file counts once);
- CPU seconds of each `dvc repro`.

``chunked`` is the default (``bucket.chunk_kb: 2048``); ``one file`` sets ``bucket.chunk_kb`` so
large that each array is one chunk, which is what `images.npy` and `features.npy` were: every
run rewrote them whole.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
Make = Callable[[Path, str, int], Path]  # bench/scale.py's make_project(root, url, n_jobs)
Write = Callable[[Path, int, int, int], dict]  # its write_photos(source, start, count, seed)
LAYOUTS = {"chunked": None, "one file": 1 << 30}  # bucket.chunk_kb (None: params.yaml's)
DATA_TARGETS = ["split", "features"]


def _files(root: Path) -> dict[tuple[int, int], int]:
    """(device, inode) -> size of every file under `root` (a hard link counts once)."""
    out: dict[tuple[int, int], int] = {}
    if not root.exists():
        return out
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            out[(stat.st_dev, stat.st_ino)] = stat.st_size
    return out


def _cache_files(project: Path) -> dict[str, int]:
    """Path -> size of every object in the DVC cache (objects are named by their hash)."""
    root = project / ".dvc" / "cache"
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*") if path.is_file()}


def _disk(project: Path) -> dict[tuple[int, int], int]:
    files: dict[tuple[int, int], int] = {}
    for part in ("data", ".dvc/cache", ".photoprep"):
        files.update(_files(project / part))
    return files


def _repro(project: Path, env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro", *DATA_TARGETS],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"dvc repro failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)


def _project(
    root: Path, n: int, seed: int, n_jobs: int, chunk_kb: int | None, make: Make, write: Write
) -> Path:
    project = make(root, "cdn/{id}", n_jobs)
    for name in ("dvc.yaml", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy(source, project / name)
    (project / "pipeline" / "pretrained").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    if chunk_kb is not None:
        params["bucket"]["chunk_kb"] = chunk_kb
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    write(project / "pipeline" / "sources" / "syn", 0, n, seed)
    return project


def disk_of_an_increment(
    work: Path, n: int, seed: int, n_jobs: int, env: dict[str, str], make: Make, write: Write
) -> dict:
    """The figures of each layout (see the module's docstring)."""
    env = dict(env, PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    added = max(1, n // 100)
    out: dict = {"n": n, "added": added, "layouts": {}}
    for label, chunk_kb in LAYOUTS.items():
        project = _project(work / label.replace(" ", "-"), n, seed, n_jobs, chunk_kb, make, write)
        print(f"disk: {label}: dvc repro at {n} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        first_cpu = _repro(project, env)
        first_wall = time.perf_counter() - started
        cache_before = _cache_files(project)
        disk_before = _disk(project)
        write(project / "pipeline" / "sources" / "syn", n, added, seed)
        print(f"disk: {label}: dvc repro after +{added} ...", file=sys.stderr, flush=True)
        again_cpu = _repro(project, env)
        cache_after = _cache_files(project)
        disk_after = _disk(project)
        cache_size = sum(cache_before.values())
        cache_added = sum(size for name, size in cache_after.items() if name not in cache_before)
        out["layouts"][label] = {
            "chunk_kb": chunk_kb,
            "cache_bytes": cache_size,
            "cache_added_bytes": cache_added,
            "cache_added_share": round(cache_added / cache_size, 4) if cache_size else None,
            "disk_bytes": sum(disk_before.values()),
            "disk_added_bytes": sum(s for key, s in disk_after.items() if key not in disk_before),
            "first_cpu_s": first_cpu,
            "first_wall_s": round(first_wall, 1),
            "rerun_cpu_s": again_cpu,
            "image_chunks": len(list((project / "data" / "processed" / "images").glob("part-*.npy"))),
        }
    return out


def print_disk(report: dict) -> None:
    mb = 1 << 20
    print(f"\n+{report['added']} photos to {report['n']:,}: `dvc repro` of the data stages, again")
    print(
        f"{'layout':10s} {'chunks':>7s} {'cache MB':>9s} {'+cache MB':>10s} {'+cache %':>9s} "
        f"{'disk MB':>8s} {'+disk MB':>9s} {'CPU s':>7s} {'re-run CPU s':>13s}"
    )
    for label, row in report["layouts"].items():
        print(
            f"{label:10s} {row['image_chunks']:7d} {row['cache_bytes'] / mb:9.1f} "
            f"{row['cache_added_bytes'] / mb:10.1f} {100 * row['cache_added_share']:8.1f}% "
            f"{row['disk_bytes'] / mb:8.1f} {row['disk_added_bytes'] / mb:9.1f} "
            f"{row['first_cpu_s']:7.1f} {row['rerun_cpu_s']:13.1f}"
        )
    print("target: +1 % photos adds at most 5 % of the cache's size to .dvc/cache")
