"""Benchmark: CPU ms a photo of the dedup stage's probe, of its hashes and colour test against
the reference (imagehash one view at a time, numpy's float32 hypot), and of what one decode
shared with the bucket would save.

    python bench/probe.py [--photos 2000] [--repeats 5] [--probe-only] [--against-rev REV] [--json]

The photos are the scale bench's synthetic heobs photos (`bench/scale.py`: 200x150 .. 480x360
JPEGs of 20-40 KB, 2 % near copies, 1 % truncated), made in memory with seed 0. Figures are
CPU seconds (`time.process_time`, what other load on a shared machine disturbs least) per photo,
medians over the repeats, the paths interleaved:

(a) probe: `photoprep.images.probe.probe_many` with the default params' spec (phash 8, margin
    0.1, crops 0.03 and 0.06: three views hashed a photo at 64 bits; the three 256-bit fine
    hashes left the probe for `probe.fine_reader`, which dedup asks only for the few rows a
    crop match reads);
(b) hashes: the six hash strings of each photo's views, imagehash's ``str(phash(view))`` one
    view at a time (the probe's way before `view_hashes`) against `view_hashes`, and whether
    every string is the same;
(c) colour: the mean chroma, ``np.hypot`` over the float32 channels against `mean_chroma`,
    and whether every value is the same;
(d) what any probe with imagehash's hashes pays: libjpeg's decode at the draft scale (open,
    draft, load), and Pillow's LANCZOS resize of the six views (crop and resize, as imagehash
    does before its DCT);
(e) one decode for the probe and the bucket, costed before it is built: the bucket's 64 x 64
    pixels as the bucket stage makes them (`resize.resized_rgb`: libjpeg's decode at the draft
    scale 64 x 64 needs, then Lanczos) against what the probe would add to make them from the
    picture it has already decoded (YCbCr at the hash's draft scale: box-reduced by a whole
    factor, Lanczos, then RGB at 64 x 64, the cheapest of the ways tried), and how many of
    those pixels differ from the bucket's (a shared decode changes them: the pixels come
    from another scale).

With ``--against-rev REV`` (a git revision, e.g. main) (a) is timed for REV's `src/` too, for a
before/after on the same photos: two worker processes, one importing each tree, probe the same
chunk of photos in turn, chunk after chunk, each timing its own CPU; the figures are the medians
over the chunks (and of the ratio of each chunk's pair), so load that comes and goes on a shared
machine falls on both alike. ``--json`` prints the figures as one JSON object and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from photoprep.core.params import DedupParams
from photoprep.images.probe import ProbeSpec, probe_many

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import photo_bytes  # bench/scale.py

HASH_SIDE = 192  # the draft target of the probe's grey for hash_size 8 (fingerprint.hash_side(8))


def cpu_ms_each(run: Callable[[], object], n: int) -> float:
    start = time.process_time()
    run()
    return (time.process_time() - start) * 1e3 / n


def greys_and_colours(blobs: list[bytes]) -> tuple[list[Image.Image], list[Image.Image], list[bytes]]:
    """Each decodable photo's grey at the probe's draft scale, its YCbCr for the colour test,
    and its bytes."""
    greys, colours, decodable = [], [], []
    for blob in blobs:
        im = Image.open(io.BytesIO(blob))
        im.draft("YCbCr", (HASH_SIDE, HASH_SIDE))
        try:
            im.load()
        except OSError:
            continue  # the truncated ones
        greys.append(im.getchannel(0))
        colours.append(im)
        decodable.append(blob)
    return greys, colours, decodable


def views_of(grey: Image.Image, trims: tuple[float, ...]) -> list[Image.Image]:
    from photoprep.images.fingerprint import trimmed

    return [trimmed(grey, trim) for trim in trims]


def reference_hashes(views: list[list[Image.Image]]) -> list[list[str]]:
    return [[str(imagehash.phash(v, hash_size=size)) for size in (8, 16) for v in vs] for vs in views]


def fast_hashes(views: list[list[Image.Image]]) -> list[list[str]]:
    from photoprep.images.fingerprint import view_hashes

    return [view_hashes(vs, "phash", 8) + view_hashes(vs, "phash", 16) for vs in views]


def reference_chroma(colours: list[Image.Image]) -> list[float]:
    out = []
    for im in colours:
        pixels = np.asarray(im, dtype=np.float32)
        out.append(float(np.hypot(pixels[..., 1] - 128, pixels[..., 2] - 128).mean()))
    return out


def decoded(blobs: list[bytes]) -> None:
    for blob in blobs:
        im = Image.open(io.BytesIO(blob))
        im.draft("YCbCr", (HASH_SIDE, HASH_SIDE))
        with contextlib.suppress(OSError):
            im.load()


def resized(views: list[list[Image.Image]]) -> None:
    lanczos = Image.Resampling.LANCZOS
    for vs in views:
        for view in vs:
            for size in (8, 16):
                view.resize((4 * size, 4 * size), lanczos)


PIXELS = (64, 64)  # bucket.size's default, (H, W)


def bucket_pixels(blobs: list[bytes]) -> list[np.ndarray]:
    """The bucket stage's pixels: each photo decoded on its own at the scale `PIXELS` needs."""
    from photoprep.images.resize import resized_rgb

    return [resized_rgb(blob, PIXELS) for blob in blobs]


def pixels_from_probe_picture(colours: list[Image.Image]) -> list[np.ndarray]:
    """The same pixels made from the probe's picture (YCbCr at the hash's draft scale), as a
    shared decode would: box-reduced by the largest whole factor that keeps `PIXELS`, Lanczos
    to `PIXELS`, then RGB (converting 64 x 64 pixels, not the picture)."""
    height, width = PIXELS
    out = []
    for im in colours:
        factor = max(1, min(im.width // width, im.height // height))
        small = im.reduce(factor) if factor > 1 else im
        out.append(np.asarray(small.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")))
    return out


def fast_chroma(colours: list[Image.Image]) -> list[float]:
    from photoprep.images.fingerprint import mean_chroma

    return [mean_chroma(im) for im in colours]


def measure(photos: int, repeats: int, probe_only: bool) -> dict:
    blobs = [photo_bytes(i, 0)[0] for i in range(photos)]
    spec = ProbeSpec.from_dedup(DedupParams())
    probe_many(blobs[:20], spec)  # imports and caches
    paths: dict[str, Callable[[], object]] = {"probe": lambda: probe_many(blobs, spec)}
    counts = {"probe": len(blobs)}
    same: dict[str, bool] = {}
    if not probe_only:
        greys, colours, decodable = greys_and_colours(blobs)
        views = [views_of(g, spec.trims) for g in greys]
        same["hashes"] = reference_hashes(views) == fast_hashes(views)
        same["colour"] = reference_chroma(colours) == fast_chroma(colours)
        shared = pixels_difference(bucket_pixels(decodable), pixels_from_probe_picture(colours))
        paths |= {
            "hashes_imagehash": lambda: reference_hashes(views),
            "hashes_view_hashes": lambda: fast_hashes(views),
            "colour_hypot": lambda: reference_chroma(colours),
            "colour_mean_chroma": lambda: fast_chroma(colours),
            "decode_alone": lambda: decoded(blobs),
            "lanczos_resizes_alone": lambda: resized(views),
            "bucket_pixels": lambda: bucket_pixels(decodable),
            "pixels_from_probe_picture": lambda: pixels_from_probe_picture(colours),
        }
        counts |= dict.fromkeys(list(paths)[1:], len(greys)) | {"decode_alone": len(blobs)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            times[name].append(cpu_ms_each(run, counts[name]))
    figures: dict = {
        "photos": len(blobs),
        "repeats": repeats,
        "views_a_photo": 2 * len(spec.trims),
        "cpu_ms_a_photo": {name: round(statistics.median(t), 4) for name, t in times.items()},
    }
    if not probe_only:
        figures["identical"] = same
        ms = figures["cpu_ms_a_photo"]
        figures["speedup"] = {
            "hashes": round(ms["hashes_imagehash"] / ms["hashes_view_hashes"], 2),
            "colour": round(ms["colour_hypot"] / ms["colour_mean_chroma"], 2),
        }
        saved = ms["bucket_pixels"] - ms["pixels_from_probe_picture"]
        figures["shared_decode"] = shared | {"cpu_ms_saved_a_photo": round(saved, 4)}
    return figures


def pixels_difference(own: list[np.ndarray], shared: list[np.ndarray]) -> dict:
    """How far the pixels a shared decode makes lie from the bucket's own."""
    gaps = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(own, shared, strict=True)]
    return {
        "photos_with_other_pixels": sum(bool(gap.any()) for gap in gaps),
        "photos_compared": len(gaps),
        "mean_abs_difference": round(float(np.mean([gap.mean() for gap in gaps])), 3),
    }


CHUNK = 250  # photos a worker probes per turn


def worker(photos: int) -> None:
    """Answer each chunk number read from stdin with the CPU ms a photo of probing that chunk."""
    blobs = [photo_bytes(i, 0)[0] for i in range(photos)]
    spec = ProbeSpec.from_dedup(DedupParams())
    probe_many(blobs[:20], spec)
    print("ready", flush=True)
    for line in sys.stdin:
        chunk = blobs[int(line) * CHUNK : (int(line) + 1) * CHUNK]
        print(cpu_ms_each(lambda chunk=chunk: probe_many(chunk, spec), len(chunk)), flush=True)


def against(rev: str, photos: int, repeats: int) -> dict:
    """probe_many of REV's tree and of this one, chunk by chunk in turn (see the module notes)."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", rev, "src"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {"before": Path(tmp) / "src", "after": repo / "src"}
        workers = {}
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            command = [sys.executable, __file__, "--worker", "--photos", str(photos)]
            workers[name] = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
        assert all(w.stdout is not None and w.stdout.readline().strip() == "ready" for w in workers.values())
        times: dict[str, list[float]] = {name: [] for name in workers}
        for _ in range(repeats):
            for chunk in range(-(-photos // CHUNK)):
                for name, w in workers.items():
                    assert w.stdin is not None and w.stdout is not None
                    w.stdin.write(f"{chunk}\n")
                    w.stdin.flush()
                    times[name].append(float(w.stdout.readline()))
        for w in workers.values():
            assert w.stdin is not None
            w.stdin.close()
            w.wait()
    ratios = [b / a for b, a in zip(times["before"], times["after"], strict=True)]
    return {
        "rev": rev,
        "chunks": len(ratios),
        "cpu_ms_a_photo": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "before_over_after": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe-only", action="store_true", help="time probe_many alone (any checkout)")
    parser.add_argument("--against-rev", help="also time probe_many of this git revision's src/, in turn")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.photos)
        return
    figures = measure(args.photos, args.repeats, args.probe_only)
    if args.against_rev:
        figures["against"] = against(args.against_rev, args.photos, args.repeats)
    if args.json:
        print(json.dumps(figures))
        return
    n, views = figures["photos"], figures["views_a_photo"]
    print(f"{n} photos, {views} hashed views a photo in (b) and (d), median of {args.repeats}")
    for name, value in figures["cpu_ms_a_photo"].items():
        print(f"  {name:22s} {value:7.3f} CPU ms a photo")
    if not args.probe_only:
        print(f"  identical: {figures['identical']}  speedup: {figures['speedup']}")
        shared = figures["shared_decode"]
        saved, changed = shared["cpu_ms_saved_a_photo"], shared["photos_with_other_pixels"]
        print(
            f"  one decode for the probe and the bucket would save {saved:.3f} CPU ms a photo and change "
            f"the pixels of {changed} of {shared['photos_compared']} photos "
            f"(mean |difference| {shared['mean_abs_difference']} levels)"
        )
    if args.against_rev:
        pair = figures["against"]
        ms = pair["cpu_ms_a_photo"]
        print(
            f"  probe at {pair['rev']}: {ms['before']:.3f}, here: {ms['after']:.3f} CPU ms a photo "
            f"(medians of {pair['chunks']} chunks in turn); "
            f"before / after, chunk by chunk: {pair['before_over_after']}"
        )


if __name__ == "__main__":
    main()
