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


def _peak_rss_mb() -> float:
    """The largest resident set this process has had (a Dask worker's, asked with `Client.run`)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mix(x, salt: int):
    """splitmix64 of each number (uint64) with `salt`: a row's random draws from its own number,
    so that any slice of rows is made alone and the same whatever the slices."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt * 0xBF58476D1CE4E5B9 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hex(words):
    """Rows of uint64 words (N x k) as N hex texts of 16 k digits (an Arrow array)."""
    import numpy as np
    import pyarrow as pa

    words = np.ascontiguousarray(words.reshape(len(words), -1).astype(">u8"))
    text = np.frombuffer(words.tobytes().hex().encode("ascii"), dtype=f"S{16 * words.shape[1]}")
    return pa.array(text).cast(pa.large_string())


def _joined(*parts):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(*parts, pa.scalar(",", pa.large_string()))


def synthetic_rows(n: int, seed: int = 0, start: int = 0):
    """Rows start .. start + n - 1 of a download table joined with probe rows, as the dedup stage
    has it before grouping; each row made from its own number (`_mix`), so any slice is the
    same rows whatever the slices. 2 % near copies of an earlier row (its hashes with two bits
    flipped), 1 % byte-identical copies (its sha256), 1 % broken."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    i = np.arange(start, start + n, dtype=np.uint64)
    draw = (_mix(i, seed * 64 + 1) >> np.uint64(11)).astype(np.float64) / 2.0**53
    earlier = ((_mix(i, seed * 64 + 2) >> np.uint64(11)).astype(np.float64) / 2.0**53 * i).astype(np.uint64)
    near = (draw < 0.02) & (i > 0)
    exact = (draw >= 0.02) & (draw < 0.03) & (i > 0)
    broken = (draw >= 0.03) & (draw < 0.04)
    base = np.where(near | exact, earlier, i)  # whose pictures the row's hashes are

    def words(salt: int, k: int):
        return np.stack([_mix(base, seed * 64 + salt + j) for j in range(k)], axis=1)

    h64 = words(3, 1)[:, 0]
    bits = _mix(i, seed * 64 + 4)
    flips = (np.uint64(1) << (bits & np.uint64(63))) | (
        np.uint64(1) << ((bits >> np.uint64(6)) & np.uint64(63))
    )
    h64 = np.where(near, h64 ^ flips, h64)
    crops = words(10, 2)
    crop_fine = words(30, 8)
    sha = np.where(exact, earlier, i) * np.uint64(2654435761)
    sizes = np.array([(320, 240), (240, 320), (400, 300), (200, 150), (256, 256), (480, 360)])
    size = sizes[(_mix(i, seed * 64 + 5) % np.uint64(6)).astype(np.int64)]
    number = i.astype(np.int64)
    digits = (number[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")  # nine digits a row
    text = np.concatenate(
        [np.frombuffer(b"syn-", np.uint8)[None].repeat(n, 0), digits.astype(np.uint8)], axis=1
    )
    ids = pa.array(np.ascontiguousarray(text).view("S13")[:, 0]).cast(pa.large_string())
    empty = pa.scalar("", pa.large_string())
    table = pd.DataFrame(
        {
            "source": "syn",
            "id": pd.array(ids, dtype="str"),
            "url": pd.array(
                pa.compute.binary_join_element_wise(pa.scalar("cdn/", pa.large_string()), ids, empty),
                dtype="str",
            ),
            "label": pd.array(np.array([f"c{k}" for k in range(10)], dtype=object)[number % 10], dtype="str"),
            "first_line": number + 1,
            "status": "ok",
            "sha256": pd.array(_hex(np.stack([np.zeros_like(sha)] * 3 + [sha], axis=1)), dtype="str"),
            "size": (_mix(i, seed * 64 + 6) % np.uint64(180_000)).astype(np.int64) + 20_000,
            "shard": "shard-0000000000000000.tar",
            "offset": number * 512,
            "format": "JPEG",
            "width": size[:, 0].astype(float),
            "height": size[:, 1].astype(float),
            "mode": "RGB",
            "valid": ~broken,
            "decode_reason": pd.array(np.where(broken, "truncated", "").astype(object), dtype="str"),
            "hash": pd.array(_hex(h64), dtype="str"),
            "colour": True,
            "lossless": False,
            "quality": 90.0,
            "camera": False,
            "fine_hash": pd.array(_hex(words(20, 4)), dtype="str"),
            "transform_hashes": "",
            "crop_hashes": pd.array(_joined(_hex(crops[:, 0]), _hex(crops[:, 1])), dtype="str"),
            "crop_fine_hashes": pd.array(
                _joined(_hex(crop_fine[:, :4]), _hex(crop_fine[:, 4:])), dtype="str"
            ),
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
    # What the split stage reads of dedup's table: the groups of two or more (dup_of marks them).
    marked = deduped.loc[deduped["dup_of"] != "", "group"]
    members = deduped.loc[deduped["group"].isin(marked), ["source", "id", "label", "group"]]
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


FILE_STEPS = ["rows", "dedup", "validate", "bucket", "split"]
SLICE = 1_000_000  # synthetic rows made and written at a time


def run_in_file(n: int, seed: int, budget: int, work: Path, backend: str = "joblib") -> dict:
    """The table steps that stream (dedup's grouping and keep rule, validate, bucket's two passes,
    split's passes) over n rows that live in a Parquet file (made first if `work` lacks it),
    within memory param `budget`: each step's wall seconds, the process's peak heap (RssAnon) and
    the outputs' sha256. With `backend` "dask", dedup runs in a session of a LocalCluster of two
    workers (its near search's keys are tasks there), started before it is timed."""
    import contextlib
    import hashlib

    import pandas as pd

    from photoprep.core import memory, parallel, tables
    from photoprep.core.layout import SPLITS
    from photoprep.core.params import BucketParams, ComputeParams, DedupParams, SplitParams, ValidateParams
    from photoprep.dataset import split_file
    from photoprep.images import bucket, dedup, validate

    work.mkdir(parents=True, exist_ok=True)
    source, out = work / "probed.parquet", {"n": n, "memory_mb": budget, "backend": backend}
    if not source.exists():
        with _Peak() as step, tables.TableWriter(source) as writer:
            for start in range(0, n, SLICE):
                writer.write(synthetic_rows(min(SLICE, n - start), seed, start))
                memory.release()
        out["rows"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak, 1)}
        return out
    out["file_mb"] = round(source.stat().st_size / 2**20, 1)
    deduped = work / f"dedup-{budget}.parquet"
    cluster = ComputeParams(backend="dask", scheduler="local", n_jobs=2)
    with parallel.session(cluster) if backend == "dask" else contextlib.nullcontext():
        out["start_mb"] = round(_anon_mb(), 1)
        with _Peak() as step:
            out["groups"] = dedup.find_duplicates_in_file(
                source, deduped, DedupParams(), budget, ["syn"], None
            )
        out["dedup"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak, 1)}
        if backend == "dask":
            with parallel.dask_client(cluster) as client:
                peaks = client.run(_peak_rss_mb)
            out["dedup"]["workers_peak_rss_mb"] = [round(mb, 1) for mb in peaks.values()]
    memory.release()
    valid = work / f"valid-{budget}.parquet"
    with _Peak() as step, tables.TableWriter(valid) as writer:
        for frame in tables.slices(deduped, budget):
            writer.write(validate.validate_images(frame, ValidateParams()))
            del frame
            memory.release()
    out["validate"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak, 1)}
    memory.release()
    images = work / f"images-{budget}.parquet"
    with _Peak() as step:
        found = bucket.count_buckets(valid, BucketParams(), budget)
        bucket.write_kept(valid, images, found, BucketParams().samples_per_bucket, budget)
    out["bucket"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak, 1)}
    out["kept"] = bucket.bucket_counts(found)["kept"]
    memory.release()
    splits = {name: work / f"{name}-{budget}.parquet" for name in SPLITS}
    with _Peak() as step:
        members = tables.rows_in_groups(
            deduped, budget, "group", "dup_of", ["source", "id", "label", "group"]
        )
        given = split_file.LabelSources(pd.DataFrame({"source": [], "id": [], "label": []}), members, ["syn"])
        table = split_file.ImagesTable(images, given, budget)
        table.count_labelled()
        out["totals"] = table.write_splits(SplitParams(), splits)["totals"]
    out["split"] = {"wall_s": round(step.wall, 2), "peak_mb": round(step.peak, 1)}
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in splits.values()))
    out["sha256"] = {
        name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for name, path in (("dedup", deduped), ("valid", valid), ("images", images))
    }
    out["sha256"]["splits"] = digest.hexdigest()[:16]
    for path in splits.values():
        path.unlink()
    images.unlink()
    valid.unlink()
    deduped.unlink()
    return out


def tables_in_file(
    n: int,
    seed: int,
    memory_mb: list[int],
    work: Path,
    env: dict[str, str],
    backends: tuple[str, ...] = ("joblib",),
) -> dict:
    """The rows made in one fresh interpreter, then `run_in_file` in a fresh one per memory param
    and backend (each from the same heap)."""
    runs = []
    for budget, backend in [
        (0, "joblib"),
        *((m, b) for m in memory_mb for b in backends),
    ]:  # 0: make the rows
        what = "making the rows" if not budget else f"memory_mb {budget}, {backend}"
        print(f"tables in a file: {n:,} rows, {what} ...", file=sys.stderr, flush=True)
        args = [sys.executable, __file__, "--child-file", str(n), str(seed), str(budget), str(work), backend]
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the table steps in a file at {n} rows failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    made, runs = runs[0], runs[1:]
    same = len({json.dumps(r["sha256"]) for r in runs}) == 1
    return {"n": n, "rows": {**made["rows"], "file_mb": runs[0]["file_mb"]}, "runs": runs, "same_bytes": same}


def print_in_file(report: dict) -> None:
    rows = report["rows"]
    print(
        f"\n{report['n']:,} synthetic probe rows in a Parquet file "
        f"({rows['file_mb']} MB, made in {rows['wall_s']} s)"
    )
    print("table steps streamed, a fresh process per memory param and backend:")
    print("wall s / the process's peak heap MB")
    steps = " ".join(f"{step:>16s}" for step in FILE_STEPS[1:])
    print(f"{'memory_mb':>10s} {'backend':>8s} {steps}  output sha256 (dedup, valid, images, splits)")
    for run in report["runs"]:
        cells = " ".join(f"{run[s]['wall_s']:7.1f} {run[s]['peak_mb']:8.1f}" for s in FILE_STEPS[1:])
        print(f"{run['memory_mb']:>10d} {run['backend']:>8s} {cells}  " + " ".join(run["sha256"].values()))
        if "workers_peak_rss_mb" in run["dedup"]:
            print(f"{'':>19s} dedup's Dask workers, peak RSS MB each: {run['dedup']['workers_peak_rss_mb']}")
    under = all(run[s]["peak_mb"] <= run["memory_mb"] for run in report["runs"] for s in FILE_STEPS[1:])
    print(f"outputs byte-identical whatever the memory param and backend: {report['same_bytes']}")
    print(f"every step's peak heap under its memory param: {under}")


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


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("--child", "--child-file"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    from photoprep.core import memory

    memory.arrow_from_malloc()  # as the stages do, before pyarrow loads
    if sys.argv[1] == "--child-file":
        print(
            json.dumps(
                run_in_file(
                    int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]
                )
            )
        )
    else:
        _child()
