"""The table steps alone at sizes no photo set here reaches: synthetic probe rows through dedup's
grouping and keep rule, validate, bucket assignment and split, in a fresh process per size.

Rows are what the probe leaves, made up: random 64-bit hashes (256-bit fine hashes, the two
cropped hashes of the default `dedup.crops`), 2 % near copies of an earlier row (its hashes with
two bits flipped), 1 % byte-identical copies (its sha256), 1 % broken, sizes from six
resolutions, ten labels. For each size it prints each step's wall seconds and the process's peak
heap (RssAnon, sampled every 20 ms) above what it held before the step ("rows": making the
table, numpy's temporary strings included), the largest step's peak per row, and what the table
holds once made.

    python bench/scale.py --tables --table-sizes 100000,1000000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

STEPS = ["rows", "dedup", "validate", "bucket", "split"]


def _anon_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Peak:
    """The largest RssAnon of this process while the block runs."""

    def __enter__(self) -> _Peak:
        self.start, self.peak, self._done = _anon_mb(), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _anon_mb())
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())


def synthetic_rows(n: int, seed: int = 0):
    """A download table joined with probe rows, as the dedup stage has it before grouping."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    h64 = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * 2 + rng.integers(0, 2, n).astype(
        np.uint64
    )
    fine = rng.integers(0, 2**63, (n, 4), dtype=np.int64).astype(np.uint64)
    crops = rng.integers(0, 2**63, (n, 2), dtype=np.int64).astype(np.uint64)
    crop_fine = rng.integers(0, 2**63, (n, 2, 4), dtype=np.int64).astype(np.uint64)
    sha = np.arange(n)
    draw = rng.random(n)
    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)
    near = (draw < 0.02) & (np.arange(n) > 0)
    flips = (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)) | (
        np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
    )
    h64[near] = h64[earlier[near]] ^ flips[near]
    fine[near] = fine[earlier[near]]
    crops[near] = crops[earlier[near]]
    crop_fine[near] = crop_fine[earlier[near]]
    exact = (draw >= 0.02) & (draw < 0.03) & (np.arange(n) > 0)
    sha[exact] = sha[earlier[exact]]
    h64[exact], fine[exact] = h64[earlier[exact]], fine[earlier[exact]]
    crops[exact], crop_fine[exact] = crops[earlier[exact]], crop_fine[earlier[exact]]
    broken = (draw >= 0.03) & (draw < 0.04)

    def hex64(a):
        return np.char.zfill(np.char.mod("%x", a), 16)

    fine_hex = hex64(fine[:, 0]) + hex64(fine[:, 1]) + hex64(fine[:, 2]) + hex64(fine[:, 3])
    crop_hex = np.char.add(np.char.add(hex64(crops[:, 0]), ","), hex64(crops[:, 1]))
    cf = [
        hex64(crop_fine[:, j, 0])
        + hex64(crop_fine[:, j, 1])
        + hex64(crop_fine[:, j, 2])
        + hex64(crop_fine[:, j, 3])
        for j in (0, 1)
    ]
    sizes = np.array([(320, 240), (240, 320), (400, 300), (200, 150), (256, 256), (480, 360)])[
        rng.integers(0, 6, n)
    ]
    ids = np.char.add("syn-", np.char.zfill(np.arange(n).astype(str), 9))
    sha_hex = np.char.zfill(np.char.mod("%x", sha.astype(np.uint64) * np.uint64(2654435761)), 64)
    table = pd.DataFrame(
        {
            "source": "syn",
            "id": ids.astype(object),
            "url": np.char.add("cdn/", ids).astype(object),
            "label": np.char.add("c", (np.arange(n) % 10).astype(str)).astype(object),
            "first_line": np.arange(n) + 1,
            "status": "ok",
            "sha256": sha_hex.astype(object),
            "size": rng.integers(20_000, 200_000, n),
            "shard": "shard-0000000000000000.tar",
            "offset": np.arange(n) * 512,
            "format": "JPEG",
            "width": sizes[:, 0].astype(float),
            "height": sizes[:, 1].astype(float),
            "mode": "RGB",
            "valid": ~broken,
            "decode_reason": np.where(broken, "truncated", "").astype(object),
            "hash": hex64(h64).astype(object),
            "colour": True,
            "lossless": False,
            "quality": 90.0,
            "camera": False,
            "fine_hash": fine_hex.astype(object),
            "transform_hashes": "",
            "crop_hashes": crop_hex.astype(object),
            "crop_fine_hashes": np.char.add(np.char.add(cf[0], ","), cf[1]).astype(object),
        }
    )
    return table


def run_size(n: int, seed: int) -> dict:
    """The steps over n rows in this process (see `_child`)."""
    import pandas as pd

    from photoprep.core import memory
    from photoprep.core.params import BucketParams, DedupParams, SplitParams, ValidateParams
    from photoprep.dataset import split
    from photoprep.images import bucket, dedup, validate

    out: dict = {"n": n, "steps": {}}
    base = _anon_mb()
    with _Peak() as step:
        table = synthetic_rows(n, seed)
    out["steps"]["rows"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak - base, 1)}
    memory.release()
    held = _anon_mb()
    out["table_mb"] = round(held - base, 1)  # what the table holds once made (numpy's strings freed)
    with _Peak() as step:
        result = dedup.find_duplicates(table, DedupParams(), ["syn"], None)
    out["steps"]["dedup"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak - held, 1)}
    out["groups"] = result.counts
    deduped = result.table.drop(columns=list(dedup.GROUPING_ONLY))
    del table, result
    memory.release()
    held = _anon_mb()
    with _Peak() as step:
        valid = validate.validate_images(deduped, ValidateParams())
    out["steps"]["validate"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak - held, 1)}
    members = deduped[["source", "id", "label", "group"]]
    del deduped
    memory.release()
    held = _anon_mb()
    with _Peak() as step:
        buckets = bucket.assign_buckets(valid, BucketParams())
        kept = buckets.table[buckets.table["kept"]].reset_index(drop=True)
        kept = kept.assign(row=range(len(kept)))
    out["steps"]["bucket"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak - held, 1)}
    del valid, buckets
    memory.release()
    held = _anon_mb()
    with _Peak() as step:
        images = kept[[c for c in split.READS if c in kept.columns]]
        labels = pd.DataFrame({"source": [], "id": [], "label": []})
        labelled = split.attach_labels(images, labels, members, priority=["syn"])
        result_split = split.assign_splits(labelled, SplitParams())
        split.split_report(result_split)
    out["steps"]["split"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak - held, 1)}
    out["kept"] = len(kept)
    out["table_steps_peak_mb"] = round(max(out["steps"][s]["peak_mb"] for s in STEPS[1:]), 1)
    return out


def _child() -> None:
    n, seed = int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(run_size(n, seed)))


def table_steps(sizes: list[int], seed: int, env: dict[str, str]) -> dict:
    """Each size in a fresh interpreter, so that each starts from the same heap."""
    runs = []
    for n in sizes:
        print(f"tables: {n:,} rows ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(n), str(seed)], env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"the table steps at {n} rows failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"sizes": sizes, "runs": runs}


def print_tables(report: dict) -> None:
    print("\ntable steps alone (synthetic probe rows): wall s / peak heap MB above the step's start")
    print(f"{'rows':>10s} " + " ".join(f"{s:>16s}" for s in STEPS) + f" {'KB a row':>9s}")
    for run in report["runs"]:
        cells = " ".join(f"{run['steps'][s]['wall_s']:7.1f} {run['steps'][s]['peak_mb']:8.1f}" for s in STEPS)
        per_row = 1024 * run["table_steps_peak_mb"] / run["n"]
        print(f"{run['n']:10,d} {cells} {per_row:9.2f}")
    print("the table once made (MB): " + ", ".join(f"{r['n']:,}: {r['table_mb']}" for r in report["runs"]))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    from photoprep.core import memory

    memory.arrow_from_malloc()  # as the stages do, before pyarrow loads
    _child()
