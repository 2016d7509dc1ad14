"""Benchmark: near-duplicate search over 64-bit perceptual hashes, multi-index vs brute force.

Run with ``python bench/near_search.py`` (a readable table) or ``--json`` (one JSON object of figures).
Two data sets per size, both deterministic for a seed:

* ``random``: uniform random hashes, 1% of them replaced by copies of others with 0..threshold bits
  flipped (planted near duplicates).
* ``skewed``: like real photo collections, where dark / near-uniform images give hashes that cluster:
  25% come from a few templates with each bit flipped with probability 0.15 (they agree on most bits,
  so they crowd the same buckets: the hard case for a multi-index), 5% are exact copies of three
  "blank image" hashes, the rest is the ``random`` set.

Each set is searched twice: its hashes alone, and with the dedup stage's defaults, where every
image also brings one cropped hash per `dedup.crops` entry (``others``) and the search finds
the (hash, cropped hash) pairs too. A cropped hash is modelled as the image's own hash with each
bit flipped with probability 0.18 (a 3 to 6 % crop moves a real photo's phash by 8 to 14 bits,
bench/dedup_quality.py), so a skewed set's cropped hashes cluster like its hashes; 1 % of the
images are planted as cropped copies (their hash within the threshold of another image's
cropped hash).

Peak memory is measured in a separate, untimed call with tracemalloc (numpy reports its buffers to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from photoprep.core.params import DedupParams
from photoprep.images.hamming import brute_force_pairs, near_duplicate_search

HASH_BYTES = 8
BRUTE_FORCE_SIZE = 10_000
TEMPLATE_COUNT = 12
TEMPLATE_FLIP_PROBABILITY = 0.15
CROP_FLIP_PROBABILITY = 0.18
DEFAULT_CROPS = len(DedupParams().crops)


def planted_hashes(n: int, threshold: int, rng: np.random.Generator, fraction: float = 0.01) -> np.ndarray:
    """Uniform random hashes, `fraction` of them overwritten by near copies (0..threshold bits flipped)."""
    hashes = rng.integers(0, 256, size=(n, HASH_BYTES), dtype=np.uint8)
    n_copies = int(n * fraction)
    sources = rng.integers(0, n, size=n_copies)
    targets = rng.choice(n, size=n_copies, replace=False)
    hashes[targets] = flip_bits(hashes[sources], rng.integers(0, threshold + 1, size=n_copies), rng)
    return hashes


def flip_bits(hashes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of `hashes` with counts[r] distinct random bits flipped in row r."""
    n_bits = hashes.shape[1] * 8
    # Random keys per bit; the counts[r] smallest in a row pick that row's distinct bits.
    ranks = np.argsort(np.argsort(rng.random((len(hashes), n_bits)), axis=1), axis=1)
    flips = ranks < counts[:, None]
    return hashes ^ np.packbits(flips, axis=1)


def skewed_hashes(n: int, threshold: int, rng: np.random.Generator) -> np.ndarray:
    """Clustered hashes: noisy copies of a few templates, blank-image duplicates, and planted random."""
    hashes = planted_hashes(n, threshold, rng)
    rows = rng.permutation(n)
    n_template, n_blank = int(n * 0.25), int(n * 0.05)
    templates = rng.integers(0, 256, size=(TEMPLATE_COUNT, HASH_BYTES), dtype=np.uint8)
    noise = rng.random((n_template, HASH_BYTES * 8)) < TEMPLATE_FLIP_PROBABILITY
    chosen = templates[rng.integers(0, TEMPLATE_COUNT, size=n_template)]
    hashes[rows[:n_template]] = chosen ^ np.packbits(noise, axis=1)
    blanks = np.array([[0x00] * HASH_BYTES, [0xFF] * HASH_BYTES, [0x80] + [0x00] * (HASH_BYTES - 1)])
    picks = blanks[rng.integers(0, len(blanks), size=n_blank)].astype(np.uint8)
    hashes[rows[n_template : n_template + n_blank]] = picks
    return hashes


def cropped_hashes(
    hashes: np.ndarray, n_crops: int, threshold: int, rng: np.random.Generator, fraction: float = 0.01
) -> np.ndarray:
    """n_crops cropped hashes per image (stacked crop by crop), and `fraction` of the images
    turned into cropped copies of others (their hash within `threshold` of a cropped hash)."""
    n = len(hashes)
    noise = rng.random((n_crops * n, HASH_BYTES * 8)) < CROP_FLIP_PROBABILITY
    others = np.tile(hashes, (n_crops, 1)) ^ np.packbits(noise, axis=1)
    n_copies = int(n * fraction)
    sources = rng.integers(0, len(others), size=n_copies)
    targets = rng.choice(n, size=n_copies, replace=False)
    hashes[targets] = flip_bits(others[sources], rng.integers(0, threshold + 1, size=n_copies), rng)
    return others


def timed(function: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall time (time.perf_counter) and CPU time of `repeats` calls, and the last result.

    CPU time (time.process_time) is reported too because on a shared machine wall time also
    measures the neighbours.
    """
    walls, cpus = [], []
    result: object = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def peak_memory_mib(function: Callable[[], object]) -> float:
    """Peak memory allocated during one call (tracemalloc), in MiB."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure_search(hashes: np.ndarray, threshold: int, others: np.ndarray | None = None) -> dict:
    """Time the multi-index search on one data set and collect its figures."""
    repeats = 3 if len(hashes) <= 100_000 else 1
    seconds, cpu_seconds, (found, stats) = timed(
        lambda: near_duplicate_search(hashes, threshold, others), repeats
    )
    peak = peak_memory_mib(lambda: near_duplicate_search(hashes, threshold, others))
    return {
        "n": len(hashes),
        "crops": 0 if others is None else len(others) // len(hashes),
        "across": stats.across,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(cpu_seconds, 4),
        "repeats": repeats,
        "unique": stats.n_unique,
        "chunks": stats.n_chunks,
        "keys": stats.n_keys,
        "candidates": stats.candidates,
        "estimated_candidates": int(stats.estimated_candidates),
        "unique_pairs": stats.pairs,
        # Input-level pairs (identical hashes included) without materialising them.
        "input_pairs": input_pair_count(found.inverse, found.pairs),
        "peak_mib": round(peak, 1),
    }


def input_pair_count(inverse: np.ndarray, pairs: np.ndarray) -> int:
    """How many rows NearPairs.expand() would return."""
    sizes = np.bincount(inverse).astype(np.int64)
    identical = int((sizes * (sizes - 1) // 2).sum())
    return identical + int((sizes[pairs[:, 0]] * sizes[pairs[:, 1]]).sum())


def measure_brute_force(hashes: np.ndarray, threshold: int, repeats: int = 3) -> dict:
    """Time brute force on a data set; extrapolate quadratically to one million hashes."""
    seconds, cpu_seconds, pairs = timed(lambda: brute_force_pairs(hashes, threshold), repeats)
    n = len(hashes)
    return {
        "n": n,
        "seconds": round(seconds, 4),
        "cpu_seconds": round(cpu_seconds, 4),
        "pairs": len(pairs),
        "extrapolated_1m_seconds": round(seconds * (1_000_000 / n) ** 2, 1),
        "extrapolated_1m_cpu_seconds": round(cpu_seconds * (1_000_000 / n) ** 2, 1),
    }


def run(
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
    threshold: int = 4,
    seed: int = 0,
    crops: int = DEFAULT_CROPS,
) -> dict:
    """Benchmark figures: search on random and skewed sets per size, alone and with `crops`
    cropped hashes per image; brute force at 10k."""
    figures: dict = {"threshold": threshold, "seed": seed, "hash_bits": HASH_BYTES * 8, "search": []}
    for n in sizes:
        for kind, make in (("random", planted_hashes), ("skewed", skewed_hashes)):
            rng = np.random.default_rng(seed)
            hashes = make(n, threshold, rng)
            others = cropped_hashes(hashes, crops, threshold, rng) if crops else None
            figures["search"].append({"set": kind, **measure_search(hashes, threshold)})
            if others is not None:
                figures["search"].append({"set": kind, **measure_search(hashes, threshold, others)})
            if n == BRUTE_FORCE_SIZE:
                brute = measure_brute_force(hashes, threshold)
                figures.setdefault("brute_force", []).append({"set": kind, **brute})
                check_against_brute_force(hashes, others, threshold, kind)
    return figures


def check_against_brute_force(
    hashes: np.ndarray, others: np.ndarray | None, threshold: int, kind: str
) -> None:
    """The search's pairs, and its (hash, cropped hash) pairs, are exactly brute force's."""
    found = near_duplicate_search(hashes, threshold, others)[0]
    if not np.array_equal(found.expand(), brute_force_pairs(hashes, threshold)):
        raise AssertionError(f"search and brute force disagree on the {kind} set")
    if others is None:
        return
    n = len(hashes)
    both = brute_force_pairs(np.concatenate([hashes, others]), threshold)
    want = both[(both[:, 0] < n) & (both[:, 1] >= n)]
    u, w = found.inverse[want[:, 0]], found.other_inverse[want[:, 1] - n]
    got = {(int(a), int(b), int(d)) for a, b, d in found.across}
    if got != {(int(a), int(b), int(d)) for a, b, d in zip(u, w, want[:, 2], strict=True)}:
        raise AssertionError(f"search and brute force disagree on the cropped hashes of the {kind} set")


def format_table(figures: dict) -> str:
    """A readable table of `run`'s figures."""
    lines = [
        f"near-duplicate search, {figures['hash_bits']}-bit hashes, threshold {figures['threshold']}",
        f"{'set':<7} {'n':>9} {'crops':>5} {'seconds':>8} {'cpu s':>7} {'unique':>9} {'chunks':>6} "
        f"{'keys':>5} {'candidates':>11} {'est.cand':>11} {'uniq.pairs':>10} {'input pairs':>11} "
        f"{'crop pairs':>10} {'peak MiB':>8}",
    ]
    for row in figures["search"]:
        lines.append(
            f"{row['set']:<7} {row['n']:>9,} {row['crops']:>5} {row['seconds']:>8.3f} "
            f"{row['cpu_seconds']:>7.3f} "
            f"{row['unique']:>9,} {row['chunks']:>6} {row['keys']:>5} {row['candidates']:>11,} "
            f"{row['estimated_candidates']:>11,} "
            f"{row['unique_pairs']:>10,} {row['input_pairs']:>11,} {row['across']:>10,} "
            f"{row['peak_mib']:>8.1f}"
        )
    for row in figures.get("brute_force", []):
        lines.append(
            f"brute force, {row['set']} {row['n']:,}: {row['seconds']:.3f} s "
            f"({row['cpu_seconds']:.3f} s CPU), {row['pairs']:,} pairs (same as search); "
            f"extrapolated to 1M: {row['extrapolated_1m_seconds']:,.0f} s "
            f"({row['extrapolated_1m_cpu_seconds']:,.0f} s CPU)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: run the benchmark and print a table, or JSON with --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crops", type=int, default=DEFAULT_CROPS, help="cropped hashes per image (dedup.crops); 0: none"
    )
    args = parser.parse_args(argv)
    figures = run(tuple(args.sizes), args.threshold, args.seed, args.crops)
    print(json.dumps(figures) if args.json else format_table(figures))


if __name__ == "__main__":
    main()
