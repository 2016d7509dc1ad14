"""Benchmark: JPEG bytes -> DEC features, the seed's way against photoprep's.

    python bench/features.py [--n 300] [--repeats 3] [--batch-size 32] [--json]

(a) seed path: full PIL decode, convert RGB, resize to 64x64, skimage hog, cv2 colour map,
    one image after another (photoprep.images.features.reference_features does the features);
(b) photoprep path: JPEG decoded at reduced scale (``Image.draft``) and resized to 64x64, then
    photoprep.images.features.compute_features, in batches; with n_jobs=2 each worker decodes its own
    batch, so decoding runs in parallel too. As in the pipeline (photoprep.images), the bytes lie
    in a tar shard written by photoprep.ingest.store and each batch reads its own from (shard, offset,
    size), so the workers are sent locations, not bytes; the seed path reads from memory. The decoder is
    photoprep.images.resize.resized_rgb when
    that module exists, else the bench's own ``_bench_decode`` (figure ``decoder`` says which).

The images are photo-like JPEGs (skimage.data photos, rescaled to 640x480 .. 1024x768, cropped,
with a colour gradient and noise), quality 85, made in memory with a fixed seed. The paths run
interleaved; figures are medians over the repeats: wall-clock images/s and ms/image, speedups
over the seed path, CPU ms/image of the in-process paths (what other load on the machine
disturbs least), and a CPU breakdown of photoprep's path (decode with either decoder, features).
``--json`` prints the figures as one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import joblib
import numpy as np
import skimage.data
from PIL import Image

from photoprep.core.params import FeatureParams
from photoprep.images.features import compute_features, reference_features
from photoprep.ingest.blobs import read_blobs
from photoprep.ingest.store import ShardWriter

SIZE = (64, 64)  # [H, W] of the images the features are computed on
FRAMES = [(640, 480), (800, 600), (1024, 768), (480, 640), (768, 1024)]  # (W, H)
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]


def _photo(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """One photo-like RGB frame: a real photo rescaled and cropped, a colour cast, sensor noise."""
    w, h = FRAMES[rng.integers(len(FRAMES))]
    src = photos[rng.integers(len(photos))]
    zoom = rng.uniform(1.0, 1.5)
    big = cv2.resize(src, (int(w * zoom), int(h * zoom)), interpolation=cv2.INTER_LINEAR)
    top, left = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
    frame = big[top : top + h, left : left + w].astype(np.float32)
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(-40, 40, 3).astype(np.float32)
    frame += ramp + rng.normal(0, 6, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` photo-like JPEGs (quality 85) of 640x480 to 1024x768, in memory."""
    rng = np.random.default_rng(seed)
    photos = [np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(_photo(rng, photos)).save(buf, format="JPEG", quality=85)
        blobs.append(buf.getvalue())
    return blobs


# --------------------------------------------------------------------------- decoding


def _bench_decode(data: bytes, size: tuple[int, int], fit: str = "stretch") -> np.ndarray:
    """Fallback decoder (used when photoprep.images.resize is absent): reduced-scale JPEG decode, stretch."""
    im = Image.open(io.BytesIO(data))
    # libjpeg scales by 1/2, 1/4 or 1/8 while decoding, to the smallest size still >= the target.
    im.draft("RGB", (size[1], size[0]))
    # Area averaging of the remaining 1-2.5x reduction (PIL's LANCZOS costs 10x more here).
    return cv2.resize(np.asarray(im.convert("RGB")), (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _decoder() -> tuple[Callable[[bytes, tuple[int, int], str], np.ndarray], str]:
    """photoprep.images.resize.resized_rgb when that module exists, else the bench's own decoder."""
    try:
        from photoprep.images.resize import resized_rgb
    except ImportError:
        return _bench_decode, "bench._bench_decode (photoprep.images.resize absent)"
    return resized_rgb, "photoprep.images.resize.resized_rgb"


def _seed_decode(data: bytes) -> np.ndarray:
    """The seed's decode: full-size decode, RGB, PIL's default resize to 64x64."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE[1], SIZE[0])))


# --------------------------------------------------------------------------- the two paths


def seed_path(blobs: list[bytes], p: FeatureParams) -> np.ndarray:
    """One image after another: full decode, resize, skimage hog, cv2 colour map."""
    return np.concatenate([reference_features(_seed_decode(b)[None], p) for b in blobs])


def decode_and_featurise(blobs: list[bytes], p: FeatureParams) -> np.ndarray:
    """Reduced-scale decode of every image, then its features."""
    decode, _ = _decoder()
    images = np.stack([decode(b, SIZE, "stretch") for b in blobs])
    return compute_features(images, p, n_jobs=1, batch_size=len(images))[0]


def read_and_featurise(store_dir: Path, refs: list[tuple[str, int, int]], p: FeatureParams) -> np.ndarray:
    """One batch of photoprep's path: its bytes read from the shard store, decoded, featurised."""
    return decode_and_featurise(read_blobs(store_dir, refs), p)


def store_blobs(blobs: list[bytes], directory: Path) -> list[tuple[str, int, int]]:
    """Write ``blobs`` to a shard store in ``directory``; the (shard, offset, size) of each."""
    with ShardWriter(directory, shard_bytes=256 << 20) as writer:
        shas = [writer.add(b) for b in blobs]
    refs = writer.flush()
    return [(refs[s].shard, refs[s].offset, refs[s].size) for s in shas]


def photoprep_path(
    store_dir: Path, refs: list[tuple[str, int, int]], p: FeatureParams, n_jobs: int, batch_size: int
) -> np.ndarray:
    """photoprep's path over all images, batches in ``n_jobs`` joblib workers."""
    batches = [refs[s : s + batch_size] for s in range(0, len(refs), batch_size)]
    if n_jobs == 1:
        parts = [read_and_featurise(store_dir, b, p) for b in batches]
    else:
        work = joblib.delayed(read_and_featurise)
        parts = joblib.Parallel(n_jobs=n_jobs)(work(store_dir, b, p) for b in batches)
    return np.concatenate(parts)


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(n: int, repeats: int, batch_size: int, store_dir: Path) -> dict[str, object]:
    """Images/s of the seed path and of photoprep's path with 1 and 2 workers."""
    p = FeatureParams()
    blobs = make_jpegs(n)
    refs = store_blobs(blobs, store_dir)
    if len(set(refs)) != n:
        raise SystemExit("bench: two generated JPEGs are byte-identical; the store would keep one")
    runs: dict[str, Callable[[], object]] = {
        "seed": lambda: seed_path(blobs, p),
        "photoprep_n_jobs_1": lambda: photoprep_path(store_dir, refs, p, 1, batch_size),
        "photoprep_n_jobs_2": lambda: photoprep_path(store_dir, refs, p, 2, batch_size),
    }
    # Warm up: imports, caches, and the loky workers (their start-up is not per-image work).
    seed_path(blobs[:4], p)
    photoprep_path(store_dir, refs[:8], p, 1, batch_size)
    photoprep_path(store_dir, refs[: 4 * batch_size], p, 2, batch_size)
    load_before = os.getloadavg()[0]
    # Interleaved, so that a burst of other load on the machine hits every path alike.
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(run))
    seconds = {name: statistics.median(wall for wall, _ in t) for name, t in times.items()}
    # CPU time of the in-process paths is the figure other load on the machine disturbs least.
    cpu = {name: statistics.median(c for _, c in times[name]) for name in ("seed", "photoprep_n_jobs_1")}
    figures: dict[str, object] = {
        "n_images": n,
        "repeats": repeats,
        "batch_size": batch_size,
        "mean_jpeg_kb": round(sum(map(len, blobs)) / n / 1024, 1),
        "decoder": _decoder()[1],
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
    }
    for name, s in seconds.items():
        figures[f"{name}_images_per_s"] = round(n / s, 1)
        figures[f"{name}_ms_per_image"] = round(1e3 * s / n, 3)
    for name in ("photoprep_n_jobs_1", "photoprep_n_jobs_2"):
        figures[f"{name}_speedup_vs_seed"] = round(seconds["seed"] / seconds[name], 2)
    for name, s in cpu.items():
        figures[f"{name}_cpu_ms_per_image"] = round(1e3 * s / n, 3)
    figures["photoprep_n_jobs_1_cpu_speedup_vs_seed"] = round(cpu["seed"] / cpu["photoprep_n_jobs_1"], 2)
    figures.update(_breakdown(blobs, p, repeats))
    return figures


def _breakdown(blobs: list[bytes], p: FeatureParams, repeats: int) -> dict[str, float]:
    """CPU ms per image of the parts of photoprep's path: decode (both decoders), features."""
    decode, _ = _decoder()
    images = np.stack([decode(b, SIZE, "stretch") for b in blobs])
    parts: dict[str, Callable[[], object]] = {
        "decode": lambda: [decode(b, SIZE, "stretch") for b in blobs],
        "bench_decode": lambda: [_bench_decode(b, SIZE) for b in blobs],
        "features": lambda: compute_features(images, p, n_jobs=1, batch_size=len(images)),
    }
    figures = {}
    for name, run in parts.items():
        cpu = statistics.median(_timed(run)[1] for _ in range(repeats))
        figures[f"{name}_cpu_ms_per_image"] = round(1e3 * cpu / len(blobs), 3)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="number of images")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per joblib task")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="photoprep-bench-") as store_dir:
        figures = measure(args.n, args.repeats, args.batch_size, Path(store_dir))
    if args.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    print(
        f"\nphotoprep vs seed: {figures['photoprep_n_jobs_1_speedup_vs_seed']}x on one core "
        f"(target >= 3.5x), {figures['photoprep_n_jobs_2_speedup_vs_seed']}x with two (target >= 6x)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
