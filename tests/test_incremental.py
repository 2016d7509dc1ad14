"""Adding photos costs the new photos: memos decode and featurize only what is new, old photos
keep their split, outputs equal a from-scratch run, and a killed stage resumes from its memo.

The stages are the real scripts of stages/, run on a small synthetic `heobs` source in a
temporary project (in this process, or as a real subprocess where one is killed).
"""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ("dedup", "validate", "bucket", "features", "split")
OUTPUTS = (
    "data/interim/dedup.parquet",
    "data/interim/valid.parquet",
    "data/processed/images",
    "data/processed/images.parquet",
    "data/features/features",
    "data/features/features.parquet",
    "data/features/features.json",
    "data/splits/train.parquet",
    "data/splits/val.parquet",
    "data/splits/test.parquet",
    "reports/splits.json",
)
STORE_COLUMNS = ["attempts", "shard", "offset"]
CARRY_STORE = ("data/interim/dedup.parquet", "data/interim/valid.parquet", "data/processed/images.parquet")


def _photo(i: int) -> bytes:
    """A small photo-like JPEG, different for every i (two resolutions)."""
    rng = np.random.default_rng(i)
    h, w = (48, 64) if i % 3 else (60, 80)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * (x[..., None] + rng.uniform(0, 1) * y[..., None])
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_project(root: Path, n: int, *, batch_size: int = 8) -> Path:
    """A project with the stage scripts, params for a source 'syn' of n photos, one job."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "stages", root / "stages", dirs_exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sources"] = ["syn"]
    params["compute"].update(n_jobs=1, batch_size=batch_size)
    params["bucket"]["chunk_kb"] = 48  # about 4 photos of 64x64 a chunk: many chunks, even here
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    source = root / "pipeline" / "sources" / "syn"
    (source / "cdn").mkdir(parents=True, exist_ok=True)
    (source / "source.yaml").write_text(
        'format: heobs\nmanifest: photos.txt\nurl: "cdn/{id}"\nlabels: labels.csv\n'
    )
    add_photos(root, range(n))
    return root


def add_photos(root: Path, numbers: range) -> None:
    """Write photos `numbers` into the source and append them to its manifest and labels."""
    source = root / "pipeline" / "sources" / "syn"
    for i in numbers:
        (source / "cdn" / f"p{i:04d}").write_bytes(_photo(i))
    with open(source / "photos.txt", "a", encoding="utf-8") as manifest:
        manifest.writelines(f"p{i:04d} | photo {i} | eng\n" for i in numbers)
    labels = source / "labels.csv"
    if not labels.exists():
        labels.write_text("id,label\n")
    with open(labels, "a", encoding="utf-8") as out:
        out.writelines(f"p{i:04d},{'ab'[i % 2]}\n" for i in numbers)


def run_stage(root: Path, stage: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """Run stages/<stage>.py as `python stages/<stage>.py` would, in this process."""
    with monkeypatch.context() as patch:
        patch.chdir(root)
        patch.delenv("PHOTOPREP_CACHE", raising=False)
        patch.setattr(sys, "argv", [f"stages/{stage}.py", *args])
        patch.syspath_prepend(str(root / "stages"))  # as `python stages/x.py` puts its folder first
        runpy.run_path(str(root / "stages" / f"{stage}.py"), run_name="__main__")


def run_data_stages(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_stage(root, "download", monkeypatch, "syn")
    for stage in DATA_STAGES:
        run_stage(root, stage, monkeypatch)


def decodes(root: Path) -> list[dict]:
    log = root / ".photoprep" / "cache" / "decodes.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def last_counts(root: Path) -> dict[str, dict]:
    """The latest decode record of each memo (probe, pixels, thumbs, features)."""
    return {entry["stage"]: entry for entry in decodes(root)}


def contents(path: Path) -> bytes | dict[str, bytes]:
    """A file's bytes, or a folder's (a chunked array): each file's name and bytes."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


def splits_of(root: Path) -> dict[str, str]:
    tables = [pd.read_parquet(p) for p in sorted((root / "data" / "splits").glob("*.parquet"))]
    table = pd.concat(tables)
    return dict(zip(table["id"], table["split"], strict=True))


def test_adding_photos_decodes_and_featurizes_only_the_new_ones(tmp_path, monkeypatch):
    project = make_project(tmp_path / "grown", 40)
    run_data_stages(project, monkeypatch)
    first = last_counts(project)
    assert first["probe"]["decoded"] == 40 and first["features"]["decoded"] > 30
    before = splits_of(project)

    add_photos(project, range(40, 44))
    run_data_stages(project, monkeypatch)
    again = last_counts(project)
    assert (again["probe"]["decoded"], again["probe"]["cached"]) == (4, 40)
    assert again["pixels"]["decoded"] == 4
    assert again["features"]["decoded"] == 4
    after = splits_of(project)
    assert {k: after[k] for k in before} == before  # old photos keep their split
    assert len(after) == len(before) + 4

    # The grown project's outputs equal those of a run from scratch over the same 44 photos:
    # arrays and split tables byte for byte; the tables that carry the download's bookkeeping
    # (where the bytes lie in which shard, and `attempts`: 0 for a row the re-run kept) equal
    # apart from those columns.
    fresh = make_project(tmp_path / "fresh", 44)
    run_data_stages(fresh, monkeypatch)
    assert last_counts(fresh)["probe"]["decoded"] == 44
    for name in OUTPUTS:
        if name in CARRY_STORE:
            grown, scratch = (
                pd.read_parquet(root / name).drop(columns=STORE_COLUMNS) for root in (project, fresh)
            )
            pd.testing.assert_frame_equal(grown, scratch)
        else:
            assert contents(project / name) == contents(fresh / name), name


def test_a_rerun_with_nothing_new_decodes_nothing(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", 12)
    run_data_stages(project, monkeypatch)
    outputs = {name: contents(project / name) for name in OUTPUTS}
    for stage in DATA_STAGES:
        run_stage(project, stage, monkeypatch)
    counts = last_counts(project)
    assert [counts[m]["decoded"] for m in ("probe", "pixels", "features")] == [0, 0, 0]
    assert {name: contents(project / name) for name in OUTPUTS} == outputs


def _memo_parts(root: Path, namespace: str) -> int:
    return len(list((root / ".photoprep" / "cache" / namespace).glob("*/part-*.parquet")))


def _memo_rows(root: Path, namespace: str) -> int:
    """The keys the memo's parts hold (a batch's, or a chunk's of an output)."""
    parts = (root / ".photoprep" / "cache" / namespace).glob("*/part-*.parquet")
    return sum(len(pd.read_parquet(part)) for part in parts)


def _kill_when_parts(root: Path, stage: str, namespace: str, parts: int) -> int:
    """Start `python stages/<stage>.py`, kill -9 it once its memo holds `parts` parts; return them."""
    env = dict(os.environ)
    env.pop("PHOTOPREP_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, f"stages/{stage}.py"], cwd=root, env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while _memo_parts(root, namespace) < parts:
            assert child.poll() is None, f"{stage} ended before it was killed"
            assert time.monotonic() < deadline, f"{stage} wrote no memo parts"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return _memo_parts(root, namespace)


@pytest.mark.parametrize(("stage", "namespace"), [("dedup", "probe"), ("bucket", "pixels")])
def test_a_killed_stage_resumes_from_its_flushed_memo(tmp_path, monkeypatch, stage, namespace):
    n, batch = 240, 4
    project = make_project(tmp_path / "killed", n, batch_size=batch)
    run_stage(project, "download", monkeypatch, "syn")
    for earlier in DATA_STAGES[: DATA_STAGES.index(stage)]:
        run_stage(project, earlier, monkeypatch)
    _kill_when_parts(project, stage, namespace, parts=3)
    kept = _memo_rows(project, namespace)
    assert 3 <= kept < n - 40  # killed halfway: some batches (or chunks) flushed, not all

    run_stage(project, stage, monkeypatch)
    resumed = last_counts(project)[namespace]
    total = resumed["decoded"] + resumed["cached"]
    # Only what no flushed part held is decoded again.
    assert resumed["cached"] == kept
    assert resumed["decoded"] == total - kept

    clean = make_project(tmp_path / "clean", n, batch_size=batch)
    run_stage(clean, "download", monkeypatch, "syn")
    for earlier in DATA_STAGES[: DATA_STAGES.index(stage) + 1]:
        run_stage(clean, earlier, monkeypatch)
    output = {"dedup": "data/interim/dedup.parquet", "bucket": "data/processed/images"}[stage]
    assert contents(project / output) == contents(clean / output)


def test_images_written_in_chunks_equal_the_in_memory_array(tmp_path, monkeypatch):
    from photoprep.core import chunked
    from photoprep.core.params import ComputeParams
    from photoprep.images import stored
    from photoprep.images.decode import DecodeLimits
    from photoprep.images.resize import PixelSpec

    project = make_project(tmp_path / "p", 23)
    run_stage(project, "download", monkeypatch, "syn")
    table = pd.read_parquet(project / "data" / "raw" / "syn.parquet")
    table = pd.concat([table, table.iloc[[4, 2]]], ignore_index=True)  # repeated bytes, out of order
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache"))
    raw = project / "data" / "raw"
    compute = ComputeParams(n_jobs=2, batch_size=5)
    spec = PixelSpec((24, 32), "pad", DecodeLimits(10**8))
    stored.write_pixels(table, raw, spec, compute, tmp_path / "streamed", chunk_bytes=4 * 24 * 32 * 3)
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "another cache"))  # decoded afresh
    in_memory = stored.resized_pixels(table, raw, spec, ComputeParams(n_jobs=1, batch_size=64))
    streamed = chunked.ChunkedArray(tmp_path / "streamed")
    assert streamed.chunks > 2 and np.asarray(streamed).tobytes() == in_memory.tobytes()
    assert in_memory.shape == (25, 24, 32, 3) and in_memory.std() > 0


def test_the_pixels_are_resized_in_threads_of_the_stages_process_not_in_worker_processes(
    tmp_path, monkeypatch
):
    """Under joblib the bucket stage's resize runs in `compute.n_jobs` threads: no worker process
    with its own copy of numpy, Pillow and photoprep (photoprep.core.parallel's notes)."""
    import threading

    from photoprep.core import parallel
    from photoprep.core.params import ComputeParams
    from photoprep.images import resize, stored
    from photoprep.images.decode import DecodeLimits
    from photoprep.images.resize import PixelSpec

    psutil = pytest.importorskip("psutil")
    project = make_project(tmp_path / "p", 23)
    run_stage(project, "download", monkeypatch, "syn")
    table = pd.read_parquet(project / "data" / "raw" / "syn.parquet")
    monkeypatch.setenv("PHOTOPREP_CACHE", str(tmp_path / "cache"))
    parallel.release_workers()
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    ran_in: set[int] = set()
    resized = resize.resized_rgb

    def spy(*args, **kwargs):
        ran_in.add(threading.get_ident())
        return resized(*args, **kwargs)

    monkeypatch.setattr(resize, "resized_rgb", spy)  # a worker process would run the real one
    spec = PixelSpec((24, 32), "pad", DecodeLimits(10**8))
    stored.write_pixels(
        table, project / "data" / "raw", spec, ComputeParams(n_jobs=2, batch_size=5), tmp_path / "out"
    )
    assert not {child.pid for child in psutil.Process().children(recursive=True)} - before
    assert ran_in and threading.get_ident() not in ran_in
