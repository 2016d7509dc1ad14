"""Benchmark: DEC (photoprep.learn.dec) time to convergence, and what it finds in a larger
rendering of the digits.

    python bench/cluster.py [--sizes 10000 100000] [--devices cpu cuda] [--epochs N] [--max-iter N]
                            [--digits 20000] [--digit-epochs N] [--json]

(a) Timing, on synthetic feature vectors of the default dimension (3036 = 2916 HOG + 120 Cr/Cb):
    ten Gaussian clusters in a 32-dimensional latent space mapped linearly into 3036 dimensions,
    plus noise (fixed seed). For each size and device, DEC with the default params (d-500-500-2000-10,
    batch 256, refinement to tol 0.001 with a target update per pass) through
    ``photoprep.learn.dec.fit_dec``: pretraining seconds per epoch, k-means in the embedding, and the
    refinement to convergence (iterations, target updates, seconds). On the CPU only ``--epochs``
    pretraining epochs run (default 1: the default 100 take over an hour at 100k on 2 cores), and
    ``projected_default_s`` adds the default epochs at the measured rate to the rest; on CUDA the
    default epochs run (override with ``--epochs``).
(b) Quality, on ``--digits`` images (default 20,000): scikit-learn's 1,797 digits each drawn about
    eleven times by the demo's own renderer (``photoprep.demo.draw_digit``: a random smooth colour
    background, a random glyph size and offset, three frame sizes), stretched to 64 x 64 as the
    bucket stage does, then ``photoprep.images.features.compute_features`` with the default params.
    ``photoprep.learn.cluster.cluster_features`` with ``blocks: [hog]`` (the demo's params.yaml; the
    colour map is noise here) and ``--digit-epochs`` pretraining epochs (default 10 on the CPU: with
    11x the demo's images, 10 epochs are as many steps as the demo's 100; the default on CUDA) scores
    the three methods: k-means on the features, k-means on the pretrained embedding (DEC's start) and DEC.

Figures are single runs (DEC is deterministic for a seed); wall-clock seconds are from
``time.perf_counter``. ``--cpu-math=portable|vendor|native`` pins the CPU math as
``compute.cpu_math`` does (default portable, 2 threads): DEC's dense layers are matrix products,
which MKL's portable (COMPATIBLE) branch computes slower than its AVX2 one. ``--json`` prints one
JSON object of figures only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from photoprep import portable

_EARLY = argparse.ArgumentParser(add_help=False)
_EARLY.add_argument("--cpu-math", default="portable")
CPU_MATH = _EARLY.parse_known_args()[0].cpu_math  # before numpy and torch load; "--cpu-math X" too
portable.pin_cpu_math(CPU_MATH, threads=2)  # before numpy and torch load, as the stages do

import cv2  # noqa: E402
import joblib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from photoprep import demo  # noqa: E402
from photoprep.core.params import ClusterParams, FeatureParams  # noqa: E402
from photoprep.images.features import compute_features  # noqa: E402
from photoprep.learn import cluster, dec, scores  # noqa: E402

DIM = 3036
LATENT = 32
DEFAULT_EPOCHS = ClusterParams().pretrain_epochs
SIZE = (64, 64)


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(line, flush=True)


# --------------------------------------------------------------------------- (a) timing


def synthetic_features(n: int, seed: int = 0, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 vectors of ``DIM``: k Gaussian clusters in a latent space, mapped linearly,
    plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (k, LATENT)).astype(np.float32)
    mixing = (rng.normal(0, 1.0, (LATENT, DIM)) / math.sqrt(LATENT)).astype(np.float32)
    truth = rng.integers(0, k, n)
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 20_000):
        part = truth[start : start + 20_000]
        latent = centres[part] + rng.normal(0, 1.2, (len(part), LATENT)).astype(np.float32)
        x[start : start + len(part)] = latent @ mixing + rng.normal(0, 0.5, (len(part), DIM)).astype(
            np.float32
        )
    return x, truth


def time_dec(n: int, device: str, epochs: int, max_iter: int) -> dict:
    x, truth = synthetic_features(n)
    t0 = time.perf_counter()
    scaled, mean, scale = cluster.scale_inputs(x)
    scale_s = time.perf_counter() - t0
    del x
    p = ClusterParams(pretrain_epochs=epochs, device=device, max_iter=max_iter)
    fit = dec.fit_dec(scaled, mean, scale, p, log=None)
    per_epoch = fit.perf["pretrain_s"] / epochs if epochs else 0.0
    rest = scale_s + fit.perf["kmeans_embedding_s"] + fit.perf["refine_s"]
    return {
        "n": n,
        "device": fit.perf["device"],
        "pretrain_epochs_run": epochs,
        "pretrain_s_per_epoch": round(per_epoch, 3),
        "kmeans_embedding_s": round(fit.perf["kmeans_embedding_s"], 3),
        "refine_s": round(fit.perf["refine_s"], 3),
        "refine_iterations": fit.refinement.iterations,
        "target_updates": fit.refinement.updates,
        "converged": fit.refinement.converged,
        "measured_s": round(
            scale_s + fit.perf["pretrain_s"] + fit.perf["kmeans_embedding_s"] + fit.perf["refine_s"], 3
        ),
        "projected_default_s": round(DEFAULT_EPOCHS * per_epoch + rest, 1),
        "synthetic_accuracy": round(scores.unsupervised_accuracy(truth, fit.clusters), 4),
    }


# --------------------------------------------------------------------------- (b) digits


def _render_chunk(start: int, stop: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits ``start..stop-1`` (digit ``i % 1797``), each on its own background; seeded per chunk."""
    digits = load_digits()
    rng = np.random.default_rng([seed, start])
    images = np.empty((stop - start, *SIZE, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    for k, i in enumerate(range(start, stop)):
        which = i % len(digits.images)
        h, w = demo.size_of(i, rng)
        pixels = demo.draw_digit(digits.images[which], h, w, rng)
        images[k] = cv2.resize(pixels, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
        labels[k] = digits.target[which]
    return images, labels


def render_digits(n: int, seed: int = 1, n_jobs: int = 2, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 64 x 64 renderings and their digit; the same for any ``n_jobs``."""
    parts = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_render_chunk)(s, min(s + chunk, n), seed) for s in range(0, n, chunk)
    )
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def digits_quality(n: int, device: str, epochs: int, n_jobs: int) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    images, labels = render_digits(n, n_jobs=n_jobs)
    render_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features, info = compute_features(images, FeatureParams(), n_jobs=n_jobs)
    features_s = time.perf_counter() - t0
    keys = pd.DataFrame({"source": "bench", "id": [f"{i:06d}" for i in range(n)], "row": np.arange(n)})
    p = ClusterParams(blocks=["hog"], pretrain_epochs=epochs, device=device)
    inp = cluster.features_input(features, info, keys, p)
    result = cluster.cluster_features(inp, [str(v) for v in labels], p, log=None)
    perf = result.perf
    return {
        "n": n,
        "device": perf["device"],
        "pretrain_epochs": epochs,
        "methods": result.metrics["methods"],
        "dec": {k: result.metrics["dec"][k] for k in ("iterations", "target_updates", "converged")},
        "seconds": {
            "render": round(render_s, 1),
            "features": round(features_s, 1),
            "kmeans_features": round(perf["kmeans_features_s"], 1),
            "pretrain": round(perf["pretrain_s"], 1),
            "kmeans_embedding": round(perf["kmeans_embedding_s"], 1),
            "refine": round(perf["refine_s"], 1),
        },
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="synthetic set sizes to time (none: skip the timing)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cpu, and cuda when there is one",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"pretraining epochs timed (default: 1 on the CPU, {DEFAULT_EPOCHS} on CUDA)",
    )
    parser.add_argument(
        "--max-iter", type=int, default=ClusterParams().max_iter, help="most refinement batches"
    )
    parser.add_argument("--digits", type=int, default=20_000, help="rendered digits to cluster (0: skip)")
    parser.add_argument(
        "--digit-epochs",
        type=int,
        default=None,
        help=f"pretraining epochs on the digits (default: 10 on the CPU, {DEFAULT_EPOCHS} on CUDA)",
    )
    parser.add_argument(
        "--n-jobs", type=int, default=min(2, os.cpu_count() or 1), help="render/feature workers"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--cpu-math", default="portable", choices=list(portable.MODES), help="compute.cpu_math"
    )
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")

    figures: dict = {
        "threads": torch.get_num_threads(),
        "cpu_math": args.cpu_math,
        "timing": {},
        "digits": None,
    }
    t_all = time.perf_counter()
    for device in devices:
        epochs = args.epochs if args.epochs is not None else (1 if device == "cpu" else DEFAULT_EPOCHS)
        rows = []
        for n in args.sizes:
            row = time_dec(n, device, epochs, args.max_iter)
            rows.append(row)
            _say(
                args,
                f"{device} n={n}: {row['pretrain_s_per_epoch']} s/epoch, refine {row['refine_s']} s "
                f"({row['refine_iterations']} batches, {row['target_updates']} updates, converged "
                f"{row['converged']}); default run projected {row['projected_default_s']} s",
            )
        figures["timing"][device] = rows
    if args.digits:
        device = "cuda" if "cuda" in devices else "cpu"
        epochs = (
            args.digit_epochs
            if args.digit_epochs is not None
            else (10 if device == "cpu" else DEFAULT_EPOCHS)
        )
        figures["digits"] = digits_quality(args.digits, device, epochs, args.n_jobs)
        for name, s in figures["digits"]["methods"].items():
            _say(
                args,
                f"digits n={args.digits} {name}: accuracy {s['accuracy']:.3f}, NMI {s['nmi']:.3f}, "
                f"ARI {s['ari']:.3f}",
            )
        _say(args, f"digits seconds: {figures['digits']['seconds']}")
    figures["total_s"] = round(time.perf_counter() - t_all, 1)
    if args.json:
        print(json.dumps(figures))
    else:
        _say(args, f"total {figures['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
