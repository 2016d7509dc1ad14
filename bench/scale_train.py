"""The training part of bench/scale.py (``--train``): one process against DDP ranks on this machine.

A synthetic labelled dataset (``--train-n`` uint8 64 x 64 photos, ten classes: a bright square
at a class-dependent place on noise) is written as the split stage leaves it (the images' chunks,
the split tables, ``reports/splits.json``). Then ``python stages/train.py`` runs as the pipeline
runs it, with the default params but ``train.epochs`` and ``device: cpu``:

- ``1 process``: ``train.nproc: 1``, ``compute.threads: T`` (one process, T threads);
- ``N ranks``:   ``train.nproc: N``, ``compute.threads: T`` (gloo, T // N threads per rank);
- and, for scale, ``1 process x 1 thread``: what one core does alone. On a busy machine T
  threads of one process can wait on each other (spinning) far longer than N ranks of one
  thread wait on their all-reduce; this row tells that effect from the gain of more cores.

Per run: the train stage's own ``train_images_per_s`` (reports/train_perf.json: images through
the optimiser per second of training, every rank's counted) and the stage's wall time (start-up,
launch, data loading and validation included). Median of ``--repeats``; ``ratio`` = N ranks /
1 process. Run from bench/scale.py, which owns the CLI and ``--json``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from photoprep.core import chunked, io
from photoprep.core.params import SplitParams
from photoprep.dataset.split import assign_splits, split_report

REPO = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, n: int, seed: int, size: int = 64) -> None:
    """``n`` photos of ten classes as the split stage leaves them under ``root``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    pixels = rng.integers(0, 96, (n, size, size, 3), dtype=np.uint8)
    side = size // 4
    for i, label in enumerate(labels):
        top, left = (label // 4) * side + rng.integers(0, 4), (label % 4) * side + rng.integers(0, 4)
        pixels[i, top : top + side, left : left + side] = 160 + rng.integers(0, 96, 3, dtype=np.uint8)
    table = pd.DataFrame(
        {
            "source": "syn",
            "id": [f"{i:06d}" for i in range(n)],
            "sha256": [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels],
            "label": [str(v) for v in labels],
        }
    )
    (root / "data/processed").mkdir(parents=True, exist_ok=True)
    chunked.save(root / "data/processed/images", pixels)
    io.write_table(table.assign(row=range(n)), root / "data/processed/images.parquet")
    result = assign_splits(table, SplitParams())
    for name in ("train", "val", "test", "unlabeled"):
        part = result.table[result.table["split"] == name].reset_index(drop=True)
        io.write_table(part, root / f"data/splits/{name}.parquet")
    io.write_json(split_report(result), root / "reports/splits.json")


def run_train(root: Path, env: dict[str, str], nproc: int, threads: int, epochs: int, model: str) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update({"nproc": nproc, "epochs": epochs, "model": model, "device": "cpu"})
    raw["compute"]["threads"] = threads
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "stages/train.py")], cwd=root, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"train (nproc {nproc}) failed:\n{done.stderr[-3000:]}")
    perf = json.loads((root / "reports/train_perf.json").read_text())
    return {"images_per_s": perf["train_images_per_s"], "wall_s": round(wall, 2)}


def train_scaling(
    work: Path, env: dict[str, str], n: int, nproc: int, threads: int, epochs: int, model: str, repeats: int
) -> dict:
    """Train images/s of one process (``threads`` threads) and of ``nproc`` gloo ranks."""
    root = work / "train"
    write_dataset(root, n, seed=0)
    runs: dict[str, list[dict]] = {"single": [], "ddp": [], "one_thread": []}
    for _ in range(repeats):  # interleaved, so that a change in the machine's load hits all
        runs["single"].append(run_train(root, env, 1, threads, epochs, model))
        runs["ddp"].append(run_train(root, env, nproc, threads, epochs, model))
        runs["one_thread"].append(run_train(root, env, 1, 1, epochs, model))

    def median(kind: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[kind]), 2)

    single, ddp = median("single", "images_per_s"), median("ddp", "images_per_s")
    return {
        "model": model,
        "images": n,
        "train_images": int(pd.read_parquet(root / "data/splits/train.parquet").shape[0]),
        "epochs": epochs,
        "repeats": repeats,
        "single": {
            "processes": 1,
            "threads": threads,
            "images_per_s": single,
            "wall_s": median("single", "wall_s"),
        },
        "ddp": {
            "processes": nproc,
            "threads_per_rank": max(1, threads // nproc),
            "backend": "gloo",
            "images_per_s": ddp,
            "wall_s": median("ddp", "wall_s"),
        },
        "one_thread": {
            "processes": 1,
            "threads": 1,
            "images_per_s": median("one_thread", "images_per_s"),
            "wall_s": median("one_thread", "wall_s"),
        },
        "ratio": round(ddp / single, 2) if single else None,
        "ratio_to_one_thread": round(ddp / median("one_thread", "images_per_s"), 2),
        "runs": runs,
    }


def print_train(report: dict) -> None:
    t = report
    print(
        f"training: {t['model']}, {t['train_images']} train images (64x64, seen at 32x32), "
        f"{t['epochs']} epochs, median of {t['repeats']}"
    )
    s, d = t["single"], t["ddp"]
    print(
        f"  1 process x {s['threads']} threads: {s['images_per_s']:8.1f} train images/s  "
        f"{s['wall_s']:6.1f} s wall"
    )
    print(
        f"  {d['processes']} ranks x {d['threads_per_rank']} thread ({d['backend']}): "
        f"{d['images_per_s']:8.1f} train images/s  {d['wall_s']:6.1f} s wall"
    )
    o = t["one_thread"]
    print(f"  1 process x 1 thread:  {o['images_per_s']:8.1f} train images/s  {o['wall_s']:6.1f} s wall")
    print(f"  ratio {d['processes']} ranks / 1 process x {s['threads']} threads: {t['ratio']}x")
    print(f"  ratio {d['processes']} ranks / 1 process x 1 thread: {t['ratio_to_one_thread']}x")
