"""Near-duplicate search over perceptual hashes by Hamming distance.

Hashes are rows of a uint8 array (N x B bytes, most significant bit first, as imagehash prints them).
`near_duplicate_pairs` finds every pair within a threshold without comparing all pairs:

1. Identical hashes are merged first (unique rows), so a large cluster of identical hashes (blank or
   dark images) costs nothing beyond its size; `NearPairs.expand` restores input-level pairs.
2. Multi-index (pigeonhole) search: the bits are dealt into ``m >= t + 1`` chunks. Two hashes that differ
   in at most ``t`` bits differ in at most ``t`` chunks, so they agree exactly on at least ``m - t``
   chunks, i.e. on at least one of the ``C(m, t)`` *keys* made of ``m - t`` chunks. For each key the
   unique hashes are bucketed by key value (one sort), pairs within a bucket are candidates, and each
   candidate is verified with a popcount.
3. A pair usually shares several keys; it is kept only by the first key (in lexicographic order of
   chunk combinations) it agrees on, so no global de-duplication of candidates is needed.
4. With `others` (a second set, e.g. the hashes of each image's cropped versions), the same pass
   also finds every (hash, other) pair within the threshold, and no (other, other) pair: the
   distinct hashes come first and the distinct others after them, so within a bucket (rows in
   ascending order) only positions of hashes start pairs. A cross search costs about what a
   self-search of the two sets together would cost in passes, and only the wanted candidates.

``m`` is chosen per input from a cost model whose candidate counts are measured on a fixed random
sample of the hashes, so clustered (skewed) data gets more, narrower-keyed chunks than random data.
Candidates are generated and verified in bounded batches, so memory stays bounded however large a
bucket is. Results do not depend on sort stability or sample luck: output is exact and sorted.

Why one module
    The search, its cost model and the brute-force reference it is checked against belong
    together: the guarantee (exact, every pair within the threshold) is stated and tested here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from photoprep.core import parallel

__all__ = [
    "NearPairs",
    "SearchStats",
    "brute_force_pairs",
    "near_duplicate_pairs",
    "near_duplicate_search",
    "pack_hashes",
]

# Candidate pairs generated and verified per batch: bounds peak memory (~100 MB for 64-bit hashes).
_BATCH_PAIRS = 1 << 21
# Rows of the fixed random sample used to measure how many candidates each chunking would produce.
_SAMPLE_ROWS = 20_000
# Cost model, in seconds: per hash per key (hash the key, sort, find buckets) and per candidate pair
# (generate, gather, popcount), measured on 1M 64-bit hashes. Only their ratio matters for choosing
# the chunking, and a wrong ratio only costs time, never correctness.
_COST_PER_ROW_KEY = 3.5e-8
_COST_PER_CANDIDATE = 5.5e-8
# Never use more keys than this (each key is a full pass over the hashes).
_MAX_KEYS = 5_000
# Pairs of brute-force distances computed per block (bounds its memory).
_BRUTE_BLOCK = 1 << 22
# Found pairs are packed into one int64 each while (distinct hashes)^2 * (threshold + 1) stays below this.
_PACK_LIMIT = 2**63

# Keys searched at once, one thread each (bounded by the CPUs this process may use): each holds
# its own sorted bucket array, about 16 bytes a hash.
_SEARCH_THREADS = 4

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)  # odd multiplier for key hashing (2^64 / golden ratio)


@dataclass(frozen=True)
class NearPairs:
    """Near-duplicate pairs over the distinct hashes of an input, expandable to input-level pairs."""

    unique: np.ndarray  # uint8 U x B: the distinct hashes, in lexicographic byte order
    inverse: np.ndarray  # int64 N: row of `unique` for each input hash
    pairs: np.ndarray  # int64 M x 3: (u, v, distance) over rows of `unique`, u < v, 1 <= d <= t, sorted
    # With `others`: their distinct hashes, the row of `other_unique` for each other hash, and
    # (u, w, distance) rows: unique[u] is within t of other_unique[w] (0 <= d), sorted.
    other_unique: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    other_inverse: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    across: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    def expand(self) -> np.ndarray:
        """All input-level pairs (i, j, distance), i < j, sorted by (i, j); identical hashes give 0.

        Exactly what brute force over all input pairs gives. May be large for big identical groups.
        """
        return _expand_pairs(self.inverse, len(self.unique), self.pairs)


@dataclass(frozen=True)
class SearchStats:
    """Figures about one search, for benchmarks and diagnostics."""

    n_hashes: int
    n_unique: int
    n_bits: int
    threshold: int
    n_chunks: int  # m: chunks the bits are dealt into (0: no search needed, or all pairs compared)
    n_keys: int  # C(m, t): keys of m - t chunks, one bucketing pass each
    candidates: int  # candidate pairs generated over all keys (each verified by popcount)
    estimated_candidates: float  # what the cost model expected, from the sample
    pairs: int  # distinct-hash pairs found
    n_others: int = 0  # other hashes searched against (`others`)
    across: int = 0  # (hash, other) pairs found


@dataclass(frozen=True)
class _Plan:
    """A chunking: which bits form each chunk, and the keys (chunk combinations) to bucket on."""

    chunk_masks: np.ndarray  # uint64 m x W: bits of each chunk, in the word layout of `_to_columns`
    keys: tuple[tuple[int, ...], ...]  # combinations of m - t chunk indices, lexicographic order
    estimated_candidates: float


def pack_hashes(hex_hashes: Sequence[str]) -> np.ndarray:
    """imagehash hex strings (all the same length) -> uint8 array N x B (B = bytes per hash).

    Bits keep imagehash's order (most significant first); an odd number of hex digits is padded
    with a leading zero nibble, which changes no distance.
    """
    if len(hex_hashes) == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    width = len(hex_hashes[0])
    if width == 0 or any(len(h) != width for h in hex_hashes):
        raise ValueError("pack_hashes: all hex hashes must be non-empty and of the same length")
    pad = "0" if width % 2 else ""
    try:
        raw = bytes.fromhex(pad + pad.join(hex_hashes)) if pad else bytes.fromhex("".join(hex_hashes))
    except ValueError as err:
        raise ValueError(f"pack_hashes: not a hex string ({err})") from None
    n_bytes = (width + 1) // 2
    if len(raw) != len(hex_hashes) * n_bytes:  # fromhex skips whitespace
        raise ValueError("pack_hashes: hex hashes must not contain whitespace")
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(hex_hashes), n_bytes).copy()


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int, others: np.ndarray | None = None, memory_mb: int | None = None
) -> NearPairs:
    """All pairs within `threshold` bits, found with a multi-index (pigeonhole) search, never all pairs;
    with `others`, also every (hash, other) pair within it (`NearPairs.across`).

    (The one exception: when the threshold is so large for the hash size that every pigeonhole
    chunking would generate more candidates than there are pairs, all pairs are compared, in batches.)
    """
    return near_duplicate_search(hashes, threshold, others, memory_mb)[0]


def near_duplicate_search(
    hashes: np.ndarray, threshold: int, others: np.ndarray | None = None, memory_mb: int | None = None
) -> tuple[NearPairs, SearchStats]:
    """`near_duplicate_pairs`, plus figures about the search (chunking, candidate count); with
    `memory_mb`, the passes hold about that much at once at most (`_passes`), the same pairs."""
    hashes = _check_hashes(hashes, threshold)
    if others is None:
        others = np.zeros((0, hashes.shape[1]), dtype=np.uint8)
    others = _check_hashes(others, threshold)
    if len(others) and others.shape[1] != hashes.shape[1]:
        raise ValueError(
            f"others must have {hashes.shape[1]} bytes a hash like hashes (got {others.shape[1]})"
        )
    n_bits = hashes.shape[1] * 8
    columns = _to_columns(hashes)
    first, inverse = _unique_rows(columns)
    other_columns = _to_columns(others)
    other_first, other_inverse = _unique_rows(other_columns)
    n_unique, n_other = len(first), len(other_first)
    # The distinct hashes, then the distinct others: only positions below n_unique start pairs.
    stacked = columns[:, first]
    if n_unique and n_other:
        stacked = np.concatenate([stacked, other_columns[:, other_first]], axis=1)

    pairs = np.zeros((0, 3), dtype=np.int64)
    n_chunks = n_keys = candidates = 0
    estimated = 0.0
    # Distinct hashes are >= 1 bit apart, so threshold 0 (or fewer than 2 of them) needs no
    # search unless there are others, which may equal a hash.
    if (threshold > 0 and n_unique >= 2) or (n_unique and n_other):
        plan = _choose_plan(stacked, threshold, n_bits, n_unique)
        pairs, candidates = _search(stacked, threshold, plan, n_unique, memory_mb)
        n_chunks, n_keys, estimated = len(plan.chunk_masks), len(plan.keys), plan.estimated_candidates
    is_across = pairs[:, 1] >= n_unique
    across = pairs[is_across]
    across[:, 1] -= n_unique
    result = NearPairs(
        unique=_read_only(hashes[first]),
        inverse=_read_only(inverse),
        pairs=_read_only(pairs[~is_across]),
        other_unique=_read_only(others[other_first]),
        other_inverse=_read_only(other_inverse),
        across=_read_only(across),
    )
    stats = SearchStats(
        n_hashes=len(hashes),
        n_unique=n_unique,
        n_bits=n_bits,
        threshold=threshold,
        n_chunks=n_chunks,
        n_keys=n_keys,
        candidates=candidates,
        estimated_candidates=estimated,
        pairs=len(result.pairs),
        n_others=len(others),
        across=len(across),
    )
    return result, stats


def brute_force_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Reference: (i, j, distance) for all i < j within threshold, by comparing every pair,
    vectorised over blocks of rows; sorted by (i, j). Quadratic: for tests and benchmarks."""
    hashes = _check_hashes(hashes, threshold)
    columns = _to_columns(hashes)
    n = columns.shape[1]
    found = []
    block = max(1, _BRUTE_BLOCK // max(1, n * len(columns)))
    for start in range(0, max(0, n - 1), block):
        stop = min(start + block, n - 1)
        # Rows start .. stop - 1 against every row after `start`, as a (block x rest) matrix.
        dist = _distances(columns[:, start:stop, None], columns[:, None, start + 1 :])
        # flatnonzero + divmod: several times faster than a 2-D nonzero when hits are rare.
        rows, cols = np.divmod(np.flatnonzero(dist <= threshold), dist.shape[1])
        # Column c stands for row start + 1 + c: keep j > i, i.e. c >= r (few hits, so filter after).
        right = cols >= rows
        rows, cols = rows[right], cols[right]
        found.append(np.stack([rows + start, cols + start + 1, dist[rows, cols]], axis=1).astype(np.int64))
    return np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)


# --- input handling -------------------------------------------------------------------------------


def _check_hashes(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Validate a uint8 N x B hash array and a threshold in [0, 8B - 1]; return the array, C-ordered."""
    hashes = np.asarray(hashes)
    if hashes.ndim != 2 or hashes.dtype != np.uint8:
        raise ValueError(f"hashes must be a uint8 array N x B (got {hashes.dtype} {hashes.shape})")
    if hashes.shape[1] == 0 and hashes.shape[0] > 0:
        raise ValueError("hashes must have at least one byte each")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
        raise ValueError(f"threshold must be an int (got {threshold!r})")
    max_threshold = hashes.shape[1] * 8 - 1
    # An empty input may have no byte width at all (pack_hashes([])): any threshold >= 0 is fine.
    if threshold < 0 or (hashes.shape[1] > 0 and threshold > max_threshold):
        raise ValueError(f"threshold must be in [0, {max_threshold}] for {hashes.shape[1]}-byte hashes")
    return np.ascontiguousarray(hashes)


def _to_columns(hashes: np.ndarray) -> np.ndarray:
    """uint8 N x B -> uint64 W x N: word w of every hash is the contiguous row w (fast 1-D gathers).
    Words are big-endian and zero-padded on the right, so numeric word order is lexicographic byte
    order (unique rows sort as np.unique's do) and padding bits never differ."""
    n, n_bytes = hashes.shape
    n_words = max(1, -(-n_bytes // 8))
    padded = np.zeros((n, n_words * 8), dtype=np.uint8)
    padded[:, :n_bytes] = hashes
    return np.ascontiguousarray(padded.view(">u8").astype(_U64).T)


def _read_only(array: np.ndarray) -> np.ndarray:
    """The array, marked read-only (results are shared, frozen values)."""
    array.setflags(write=False)
    return array


# --- popcount and distances -----------------------------------------------------------------------

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")
_BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)  # numpy < 2


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 element (uint8 result, same shape)."""
    if _HAS_BITWISE_COUNT:  # numpy >= 2: a single vectorised instruction per word
        return np.bitwise_count(x)
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between word arrays W x ... (broadcast) -> (...), an unsigned integer type."""
    dist = _popcount(a[0] ^ b[0])
    if len(a) > 1:
        # Word by word rather than a reduction over a short last axis, which numpy does slowly.
        dist = dist.astype(np.uint16 if len(a) * 64 < 1 << 16 else np.uint32)
        for word_a, word_b in zip(a[1:], b[1:], strict=True):
            dist += _popcount(word_a ^ word_b)
    return dist


# --- unique rows ----------------------------------------------------------------------------------


def _unique_rows(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An input row for each distinct hash (in sorted hash order) and, per input row, its unique row."""
    n = columns.shape[1]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if len(columns) == 1:
        order = np.argsort(columns[0])  # not stable: any representative of identical rows will do
    else:
        order = np.lexsort(columns[::-1])  # lexsort's last key is the primary one
    ordered = columns[:, order]
    new = np.ones(n, dtype=bool)
    new[1:] = np.any(ordered[:, 1:] != ordered[:, :-1], axis=0)
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return order[new].astype(np.int64), inverse


# --- chunking plan --------------------------------------------------------------------------------


def _chunk_masks(n_bits: int, n_words: int, n_chunks: int) -> np.ndarray:
    """uint64 m x W masks dealing bit i (MSB-first) to chunk i % m. Dealing rather than cutting
    contiguous runs spreads bits of each region of the hash (e.g. the low DCT frequencies of a
    phash, which are more predictable) over all chunks."""
    masks = np.zeros((n_chunks, n_words), dtype=_U64)
    for bit in range(n_bits):
        word, offset = divmod(bit, 64)
        masks[bit % n_chunks, word] |= _U64(1) << _U64(63 - offset)
    return masks


def _key_values(columns: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """uint64 per hash: a hash of its bits under `key_mask` (equal bits -> equal value). Different
    bits can collide, which only adds candidates that verification rejects."""
    value = np.zeros(columns.shape[1], dtype=_U64)
    for w in np.flatnonzero(key_mask):
        # Multiplying by an odd constant is a bijection whose top bits depend on every input bit, and
        # `_buckets` keeps the top bits; for one word (64-bit hashes) equal values mean equal bits.
        value ^= columns[w] & key_mask[w]
        value *= _GOLDEN
    return value


def _key_mask(chunk_masks: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
    """Union of the masks of the chunks in `key` (uint64 W)."""
    return np.bitwise_or.reduce(chunk_masks[list(key)], axis=0)


def _sample_rows(n: int) -> np.ndarray:
    """A fixed (seeded) random sample of row indices, all rows when few: estimates are deterministic."""
    if n <= _SAMPLE_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=_SAMPLE_ROWS, replace=False))


def _colliding_pairs(values: np.ndarray) -> int:
    """Number of pairs of equal elements in a uint64 array."""
    counts = np.unique(values, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _choose_plan(columns: np.ndarray, threshold: int, n_bits: int, n_first: int) -> _Plan:
    """The chunking with the lowest modelled cost, candidate counts measured on a sample.

    More chunks mean wider keys (fewer candidates per key) but more keys (more passes); start at the
    plain pigeonhole m = t + 1 and stop once the passes alone cost more than the best plan found.
    When the threshold is so large for the hash size that every chunking costs more than comparing all
    pairs (tiny keys), the plan is one empty key: a single bucket, i.e. all pairs, still in batches.
    """
    n = columns.shape[1]
    # Wanted pairs: both among the first n_first rows, or one of them (never two later rows).
    all_pairs = n_first * (n_first - 1) / 2 + n_first * (n - n_first)
    empty = np.zeros((0, len(columns)), dtype=_U64)
    best_cost = n * _COST_PER_ROW_KEY + all_pairs * _COST_PER_CANDIDATE
    best = _Plan(chunk_masks=empty, keys=((),), estimated_candidates=all_pairs)
    rows = _sample_rows(n)
    sample, later = columns[:, rows], rows >= n_first
    for n_chunks in range(threshold + 1, n_bits + 1):
        n_keys = math.comb(n_chunks, threshold)
        pass_cost = n_keys * n * _COST_PER_ROW_KEY
        if pass_cost >= best_cost or n_keys > _MAX_KEYS:
            break
        masks = _chunk_masks(n_bits, len(columns), n_chunks)
        keys = tuple(combinations(range(n_chunks), n_chunks - threshold))
        estimate = sum(
            _estimate_key_candidates(sample, later, n, all_pairs, _key_mask(masks, key)) for key in keys
        )
        cost = pass_cost + estimate * _COST_PER_CANDIDATE
        if cost < best_cost:
            best_cost, best = cost, _Plan(chunk_masks=masks, keys=keys, estimated_candidates=estimate)
    return best


def _estimate_key_candidates(
    sample: np.ndarray, later: np.ndarray, n: int, all_pairs: float, key_mask: np.ndarray
) -> float:
    """Expected wanted same-key pairs among n hashes (`all_pairs` of them wanted), scaled up from
    the pairs colliding in `sample` (less those between two `later` rows, never wanted)."""
    s = sample.shape[1]
    values = _key_values(sample, key_mask)
    colliding = _colliding_pairs(values) - (_colliding_pairs(values[later]) if later.any() else 0)
    measured = colliding * (n * (n - 1)) / (s * (s - 1))
    # A key of b bits does no better than uniform hashes do: a floor against a lucky small sample.
    uniform = all_pairs * 2.0 ** -int(_popcount(key_mask).sum())
    return max(measured, uniform)


# --- the search -----------------------------------------------------------------------------------


def _passes(n: int, n_keys: int, memory_mb: int | None) -> tuple[int, int]:
    """(keys at once, hash partitions of a key's values) within `memory_mb`; a bucket is in one."""
    workers = max(1, min(n_keys, _SEARCH_THREADS, parallel.usable_cpus()))
    if memory_mb is None:
        return workers, 1
    budget = max(1, memory_mb) << 20
    workers = max(1, min(workers, budget // max(1, n * _PASS_BYTES)))
    rest = max(1, budget // workers - n * 8)  # a pass keeps its key values whole, the rest by part
    return workers, max(1, min(n // _PART_ROWS, -(-n * (_PASS_BYTES - 8) // rest)))


_PASS_BYTES = 48  # a key's pass, per hash: key values, sorted (key, row), neighbours' XOR, positions
_PART_ROWS = 4096  # hashes a partition holds at least (smaller ones save nothing and cost a scan each)


def _search(
    columns: np.ndarray, threshold: int, plan: _Plan, n_first: int, memory_mb: int | None = None
) -> tuple[np.ndarray, int]:
    """(u, v, distance) rows, u < v, u < n_first, sorted, for hashes `columns` (distinct among the
    first n_first and among the rest); and the candidate count."""
    n = columns.shape[1]
    workers, parts = _passes(n, len(plan.keys), memory_mb)
    # Found pairs are kept as one int64 code each, (u * n + v) * (t + 1) + d, when that fits: a third
    # of the memory of M x 3 rows, and a plain sort orders them. Each pair comes from exactly one key,
    # so sorting is the only post-processing needed.
    span = threshold + 1
    packable = n * n * span < _PACK_LIMIT
    # Keys are independent passes over the same columns (numpy's sorts release the GIL): threads
    # share them, or in a Dask session the workers each get them once. The pairs are sorted at the
    # end, so the result is the same for any count of threads or workers.
    job = _KeyJob(plan, threshold, n_first, parts, packable)
    per_key = parallel.map_shared(_key_pass, range(len(plan.keys)), columns, job, threads=workers)
    found = [block for blocks, _ in per_key for block in blocks]
    candidates = sum(count for _, count in per_key)
    del per_key
    if not packable:  # over ~10^9 distinct hashes: sort (u, v, d) rows instead
        pairs = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))], candidates
    codes = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    del found
    codes.sort()
    pairs = np.empty((len(codes), 3), dtype=np.int64)
    pairs[:, 2] = codes % span
    codes //= span
    pairs[:, 0], pairs[:, 1] = np.divmod(codes, n)
    return pairs, candidates


@dataclass(frozen=True)
class _KeyJob:
    """What every key's pass (`_key_pass`) shares besides the columns."""

    plan: _Plan
    threshold: int
    n_first: int  # rows that start pairs
    parts: int  # hash partitions of a key's values (`_passes`)
    packable: bool  # pairs as one int64 code each (`_search` decodes them)


def _key_pass(key_number: int, columns: np.ndarray, job: _KeyJob) -> tuple[list[np.ndarray], int]:
    """The pairs key `key_number` owns (as codes, or (u, v, d) rows when they do not pack) and its
    candidate count."""
    n, span = columns.shape[1], job.threshold + 1
    index_bits = max(1, (n - 1).bit_length())
    rows = np.arange(n, dtype=_U64)
    values = _key_values(columns, _key_mask(job.plan.chunk_masks, job.plan.keys[key_number]))
    found, candidates = [], 0
    for part in range(job.parts):  # the top bits choose the partition: they are part of the bucket
        mine = rows if job.parts == 1 else np.flatnonzero((values >> _U64(48)) % _U64(job.parts) == part)
        mine_values = values[mine] if job.parts > 1 else values
        packed, positions, counts = _buckets(mine_values, mine.astype(_U64, copy=False), index_bits)
        if job.n_first < n:  # rows ascend within a bucket: a later row has only later rows after it
            starts = _unpack_rows(packed[positions], index_bits) < job.n_first
            positions, counts = positions[starts], counts[starts]
        for a, b in _run_pairs(positions, counts, _BATCH_PAIRS):
            candidates += len(a)
            row_a, row_b = _unpack_rows(packed[a], index_bits), _unpack_rows(packed[b], index_bits)
            u, v, d = _verify(columns, row_a, row_b, job.threshold, job.plan, key_number)
            found.append((u * n + v) * span + d if job.packable else np.stack([u, v, d], axis=1))
        del packed, positions, counts, mine_values
    return found, candidates


def _buckets(values: np.ndarray, rows: np.ndarray, index_bits: int) -> tuple[np.ndarray, ...]:
    """Rows sorted into buckets by key value, and the positions that have later bucket mates.

    Returns the sorted packed array (key hash in the top 64 - index_bits bits, row in the rest), the
    positions p that share a bucket with p + 1, and for each such p how many later positions share it.
    Packing lets a plain sort (faster than argsort) do the bucketing; truncating the key hash only
    adds rare candidates, which verification rejects.
    """
    index_mask = _U64((1 << index_bits) - 1)
    packed = (values & ~index_mask) | rows
    packed.sort()
    # Same bucket <=> the packed values differ only in their row bits.
    positions = np.flatnonzero((packed[1:] ^ packed[:-1]) <= index_mask)
    # Consecutive positions form one bucket; a bucket's last member is its last position + 1.
    run_start = np.ones(len(positions), dtype=bool)
    run_start[1:] = positions[1:] != positions[:-1] + 1
    run_last = np.append(positions[:-1][run_start[1:]], positions[-1:])
    counts = run_last[np.cumsum(run_start) - 1] + 1 - positions
    return packed, positions, counts


def _unpack_rows(packed: np.ndarray, index_bits: int) -> np.ndarray:
    """Row numbers from packed (key hash, row) values."""
    return (packed & _U64((1 << index_bits) - 1)).astype(np.int64)


def _run_pairs(
    positions: np.ndarray, counts: np.ndarray, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Position pairs (p, p + 1 .. p + counts[p]) in batches of about `batch` pairs.

    A single position with more than `batch` partners is its own batch, so memory stays O(batch + N)
    however big a bucket is.
    """
    ends = np.cumsum(counts)
    start = 0
    while start < len(positions):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + batch, side="right")))
        yield _expand_run_pairs(positions[start:stop], counts[start:stop])
        start = stop


def _expand_run_pairs(positions: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, p + 1 .. p + count) for each position p, flattened."""
    first = np.repeat(positions, counts)
    # k-th pair overall: second = p + 1 + (k - pairs before p's run).
    second = np.repeat(positions + 1 - (np.cumsum(counts) - counts), counts)
    second += np.arange(len(second))
    return first, second


def _verify(
    columns: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: int, plan: _Plan, key_number: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (a, b) within threshold that key `key_number` owns: int64 arrays u < v, distance."""
    dist = _distances(columns[:, a], columns[:, b])
    near = np.flatnonzero(dist <= threshold)
    # Few candidates survive the threshold: only they need the per-chunk ownership test.
    xor = columns[:, a[near]] ^ columns[:, b[near]]
    owned = _owned_by_key(xor, plan.chunk_masks, plan.keys[key_number])
    near = near[owned]
    a, b = a[near], b[near]
    return np.minimum(a, b), np.maximum(a, b), dist[near].astype(np.int64)


def _owned_by_key(xor: np.ndarray, chunk_masks: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
    """Whether `key` is the first key (lexicographically) each pair agrees on; `xor`: W x pairs.

    Keys are combinations in lexicographic order, so a pair's first key is made of the m - t smallest
    chunks it agrees on: the pair must agree on every chunk of `key` (which also rejects key-hash
    collisions) and disagree on every other chunk below the key's last one.
    """
    owned = np.ones(xor.shape[1], dtype=bool)
    members = set(key)
    for chunk in range(max(key, default=-1) + 1):  # the empty key (all pairs) owns every pair
        agrees = ~np.any(xor & chunk_masks[chunk][:, None], axis=0)
        owned &= agrees if chunk in members else ~agrees
    return owned


# --- expansion to input-level pairs ---------------------------------------------------------------


def _expand_pairs(inverse: np.ndarray, n_unique: int, pairs: np.ndarray) -> np.ndarray:
    """Input-level (i, j, distance) rows from unique-level pairs plus identical-hash groups."""
    n = len(inverse)
    members = np.argsort(inverse, kind="stable")  # input rows grouped by unique row, ascending
    sizes = np.bincount(inverse, minlength=n_unique)
    starts = np.cumsum(sizes) - sizes

    # Identical hashes: every pair inside each group of input rows, distance 0.
    later = (starts + sizes)[inverse[members]] - 1 - np.arange(n)
    p, q = _expand_run_pairs(np.flatnonzero(later), later[later > 0])
    same = np.stack([members[p], members[q], np.zeros(len(p), dtype=np.int64)], axis=1)

    # Distinct near hashes: the cross product of the two groups of each pair.
    u, v, dist = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    cross = sizes[u] * sizes[v]
    pair_of = np.repeat(np.arange(len(pairs)), cross)
    k = np.arange(int(cross.sum())) - np.repeat(np.cumsum(cross) - cross, cross)
    i = members[starts[u[pair_of]] + k // sizes[v[pair_of]]]
    j = members[starts[v[pair_of]] + k % sizes[v[pair_of]]]
    near = np.stack([np.minimum(i, j), np.maximum(i, j), dist[pair_of]], axis=1)

    result = np.concatenate([same, near]).astype(np.int64)
    return result[np.argsort(result[:, 0] * n + result[:, 1], kind="stable")]
