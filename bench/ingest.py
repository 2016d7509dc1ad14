"""Ingest benchmark: CPU per image of the single-pass probe against the naive decode sequence,
hash agreement between the two, and near-duplicate search time over 10k..1M hashes.

    python bench/ingest.py            # readable tables
    python bench/ingest.py --json     # one JSON object of figures
    python bench/ingest.py --n 400 --repeats 5 --near-sizes 10000 100000

Part 1 generates photo-like JPEGs (scikit-image sample photos, cropped, resized to 640x480 ..
1024x768, brightness jitter and sensor-like noise, quality 85..95) and times, with
time.process_time over whole passes (median of the repeats, divided by the image count):

- naive: ``Image.open().verify()``, then a full ``load()``, then ``imagehash.phash`` on a
  full decode: what a validate-then-dedup script does;
- probe: ``photoprep.images.probe.probe`` (header checks, one reduced-scale grey decode of the
  whole stream, normalisation, phash);
- components, to place the two: full decode, full decode + phash, draft decode alone.

It then compares each probe hash with ``imagehash.phash`` of the full decode; for scale, it
does the same for a full-scale luma decode (phash bits near the median flip on any change),
and gives the distance to a near copy (half size, quality 75) under both methods.

Part 2 calls ``bench/near_search.py`` (``run(sizes, threshold, seed) -> dict``).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from skimage import data as samples

from photoprep.images import fingerprint, formats
from photoprep.images import probe as probing

BENCH_DIR = Path(__file__).resolve().parent
SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "cat",
)


# -- part 1: decode and hash -------------------------------------------------------------


def photo_like_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs between 640x480 and 1024x768: a random crop of a sample photo, resized, with
    brightness jitter, Gaussian noise (sigma 2..6) and quality 85..95."""
    pictures = [getattr(samples, name)() for name in SOURCES]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        picture = pictures[i % len(pictures)]
        width = int(rng.integers(640, 1025))
        height = int(np.clip(round(width * rng.uniform(0.66, 0.8)), 480, 768))
        src_h, src_w = picture.shape[:2]
        crop_h = int(src_h * rng.uniform(0.6, 1.0))
        crop_w = min(src_w, round(crop_h * width / height))
        crop_h = round(crop_w * height / width)
        top = int(rng.integers(0, src_h - crop_h + 1))
        left = int(rng.integers(0, src_w - crop_w + 1))
        im = Image.fromarray(picture[top : top + crop_h, left : left + crop_w]).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(im, np.float32) * rng.uniform(0.8, 1.2)
        pixels += rng.normal(0.0, rng.uniform(2.0, 6.0), pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, "JPEG", quality=int(rng.integers(85, 96))
        )
        out.append(buffer.getvalue())
    return out


def naive(blob: bytes) -> str:
    with Image.open(io.BytesIO(blob)) as im:
        im.verify()
    with Image.open(io.BytesIO(blob)) as im:
        im.load()
    with Image.open(io.BytesIO(blob)) as im:
        return str(imagehash.phash(im))


def probe(blob: bytes) -> str:
    return probing.probe(blob)["hash"]


def full_decode(blob: bytes) -> None:
    with Image.open(io.BytesIO(blob)) as im:
        im.load()


def full_decode_phash(blob: bytes) -> str:
    with Image.open(io.BytesIO(blob)) as im:
        return str(imagehash.phash(im))


DRAFT_SIDE = fingerprint.hash_side(8)  # the probe's draft target for hash_size 8


def draft_decode(blob: bytes) -> None:
    with Image.open(io.BytesIO(blob)) as im:
        im.draft("L", (DRAFT_SIDE, DRAFT_SIDE))
        im.load()


def cpu_ms_per_image(function: Callable[[bytes], object], blobs: list[bytes], repeats: int) -> float:
    """Median over `repeats` passes of the pass's process CPU time, per image, in ms."""
    function(blobs[0])  # warm caches and lazy imports
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for blob in blobs:
            function(blob)
        passes.append((time.process_time() - start) / len(blobs) * 1e3)
    return statistics.median(passes)


def _phash_distance(a: str, b: imagehash.ImageHash) -> int:
    return imagehash.hex_to_hash(a) - b


def _full_luma_phash(blob: bytes) -> imagehash.ImageHash:
    """phash of libjpeg's own grey (the Y channel) at full scale: differs from the RGB decode
    only in luma rounding, which shows how sensitive phash bits are to any change."""
    with Image.open(io.BytesIO(blob)) as im:
        im.draft("L", None)
        return imagehash.phash(im)


def _near_copy(blob: bytes) -> bytes:
    """The same photo, halved and re-encoded at quality 75: a typical near duplicate."""
    with Image.open(io.BytesIO(blob)) as im:
        small = im.convert("RGB").resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


def _stats(distances: np.ndarray) -> dict:
    counts = np.bincount(distances)
    return {
        "identical_pct": round(float((distances == 0).mean() * 100), 1),
        "mean_bits": round(float(distances.mean()), 3),
        "max_bits": int(distances.max()),
        "histogram": {int(bits): int(count) for bits, count in enumerate(counts) if count},
    }


def hash_agreement(blobs: list[bytes]) -> dict:
    """Probe hash against imagehash.phash of the full decode, per image; for scale, the same
    for a full-scale luma decode; and how far each method puts a near copy of each photo."""
    full = [imagehash.phash(Image.open(io.BytesIO(blob))) for blob in blobs]
    ours = [probe(blob) for blob in blobs]
    copies = [_near_copy(blob) for blob in blobs]
    return {
        "probe_vs_full": _stats(np.array([_phash_distance(h, f) for h, f in zip(ours, full, strict=False)])),
        "full_luma_vs_full": _stats(
            np.array([_full_luma_phash(b) - f for b, f in zip(blobs, full, strict=False)])
        ),
        "near_copy_probe": _stats(
            np.array(
                [
                    _phash_distance(probe(c), imagehash.hex_to_hash(h))
                    for c, h in zip(copies, ours, strict=False)
                ]
            )
        ),
        "near_copy_full": _stats(
            np.array(
                [imagehash.phash(Image.open(io.BytesIO(c))) - f for c, f in zip(copies, full, strict=False)]
            )
        ),
    }


def decode_figures(n: int, repeats: int, seed: int) -> dict:
    blobs = photo_like_jpegs(n, seed)
    sizes = [Image.open(io.BytesIO(blob)).size for blob in blobs]
    timed = {
        name: round(cpu_ms_per_image(function, blobs, repeats), 3)
        for name, function in (
            ("naive", naive),
            ("probe", probe),
            ("full_decode", full_decode),
            ("full_decode_phash", full_decode_phash),
            ("draft_decode", draft_decode),
        )
    }
    return {
        "n": n,
        "repeats": repeats,
        "mean_kb": round(sum(map(len, blobs)) / len(blobs) / 1e3, 1),
        "mean_megapixels": round(float(np.mean([w * h for w, h in sizes])) / 1e6, 3),
        "cpu_ms_per_image": timed,
        "naive_over_probe": round(timed["naive"] / timed["probe"], 2),
        "draft_side": DRAFT_SIDE,
        "hash_agreement": hash_agreement(blobs),
        "codecs": formats.codec_versions(),
    }


def format_decode(figures: dict) -> str:
    ms = figures["cpu_ms_per_image"]
    agree = figures["hash_agreement"]
    lines = [
        f"decode + hash, {figures['n']} photo-like JPEGs 640x480..1024x768 "
        f"(mean {figures['mean_megapixels']} MP, {figures['mean_kb']} KB), "
        f"CPU ms per image, median of {figures['repeats']} passes",
        f"  {'naive: verify, full decode, phash on a full decode':<56} {ms['naive']:>7.3f}",
        f"  {'photoprep probe (single pass)':<56} {ms['probe']:>7.3f}",
        f"  {'  ratio naive / probe':<56} {figures['naive_over_probe']:>7.2f}x",
        f"  {'full decode alone':<56} {ms['full_decode']:>7.3f}",
        f"  {'full decode + phash':<56} {ms['full_decode_phash']:>7.3f}",
        f"  {f'grey draft decode alone, shorter side >= {DRAFT_SIDE}':<56} {ms['draft_decode']:>7.3f}",
        "phash bit differences (identical %, mean, max, histogram bits:count)",
    ]
    for key, label in (
        ("probe_vs_full", "probe vs imagehash.phash(full RGB decode)"),
        ("full_luma_vs_full", "full-scale luma decode vs full RGB decode"),
        ("near_copy_probe", "near copy (1/2 size, q75) vs original, probe"),
        ("near_copy_full", "near copy (1/2 size, q75) vs original, full decode"),
    ):
        row = agree[key]
        lines.append(
            f"  {label:<52} {row['identical_pct']:>5.1f}%  {row['mean_bits']:>5.2f}  {row['max_bits']:>2}  "
            f"{row['histogram']}"
        )
    return "\n".join(lines)


# -- part 2: near-duplicate search -----------------------------------------------------------


def near_search_figures(sizes: tuple[int, ...], threshold: int, seed: int) -> tuple[dict | None, str]:
    """Figures of bench/near_search.run, and its table (or why there is none)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    try:
        import near_search  # bench/near_search.py, written alongside this file
    except ImportError as exc:
        return None, f"near-duplicate search: skipped, bench/near_search.py is not importable ({exc})"
    figures = near_search.run(sizes=sizes, threshold=threshold, seed=seed)
    table = near_search.format_table(figures) if hasattr(near_search, "format_table") else json.dumps(figures)
    return figures, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures only")
    parser.add_argument("--n", type=int, default=200, help="images in part 1")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--near-sizes",
        type=int,
        nargs="*",
        default=[10_000, 100_000, 1_000_000],
        help="hash counts for part 2; none skips it",
    )
    parser.add_argument("--threshold", type=int, default=4, help="Hamming threshold of part 2")
    args = parser.parse_args(argv)

    figures: dict = {"decode": decode_figures(args.n, args.repeats, args.seed)}
    if not args.json:
        print(format_decode(figures["decode"]), flush=True)
    if args.near_sizes:
        near, table = near_search_figures(tuple(args.near_sizes), args.threshold, args.seed)
    else:
        near, table = None, "near-duplicate search: skipped (--near-sizes with no sizes)"
    figures["near_search"] = near
    if args.json:
        if near is None:
            print(table, file=sys.stderr)
        print(json.dumps(figures))
    else:
        print()
        print(table)


if __name__ == "__main__":
    main()
