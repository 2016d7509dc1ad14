"""Near-duplicate search: the multi-index search must give exactly what brute force gives."""

from __future__ import annotations

import itertools

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from photoprep.images import hamming
from photoprep.images.hamming import (
    NearPairs,
    brute_force_pairs,
    near_duplicate_pairs,
    near_duplicate_search,
    pack_hashes,
)


def flip_bits(hashes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of `hashes` with counts[r] distinct random bits flipped in row r."""
    n_bits = hashes.shape[1] * 8
    ranks = np.argsort(rng.random((len(hashes), n_bits)), axis=1).argsort(axis=1)
    return hashes ^ np.packbits(ranks < counts[:, None], axis=1)


def planted(n: int, n_bytes: int, max_flips: int, seed: int, fraction: float = 0.05) -> np.ndarray:
    """Random hashes; `fraction` overwritten by near copies (0..max_flips bits flipped) of others."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 256, size=(n, n_bytes), dtype=np.uint8)
    k = int(n * fraction)
    sources, targets = rng.integers(0, n, size=k), rng.choice(n, size=k, replace=False)
    hashes[targets] = flip_bits(hashes[sources], rng.integers(0, max_flips + 1, size=k), rng)
    return hashes


def skewed(n: int, seed: int) -> np.ndarray:
    """Clustered 64-bit hashes: a quarter noisy copies of a few templates, 5% blank-image duplicates."""
    rng = np.random.default_rng(seed)
    hashes = planted(n, 8, 4, seed)
    rows = rng.permutation(n)
    n_template, n_blank = n // 4, n // 20
    templates = rng.integers(0, 256, size=(5, 8), dtype=np.uint8)[rng.integers(0, 5, size=n_template)]
    noise = np.packbits(rng.random((n_template, 64)) < 0.12, axis=1)
    hashes[rows[:n_template]] = templates ^ noise
    blanks = np.array([[0] * 8, [255] * 8, [128] + [0] * 7], dtype=np.uint8)
    hashes[rows[n_template : n_template + n_blank]] = blanks[rng.integers(0, 3, size=n_blank)]
    return hashes


def naive_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """All-pairs reference written independently of the module: unpacked bits, one row at a time."""
    bits = np.unpackbits(hashes, axis=1).astype(np.int64)
    rows = []
    for i in range(len(bits)):
        dist = (bits[i + 1 :] != bits[i]).sum(axis=1)
        for j in np.flatnonzero(dist <= threshold):
            rows.append((i, i + 1 + j, dist[j]))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def check_against_brute_force(
    hashes: np.ndarray, threshold: int, brute: np.ndarray | None = None
) -> NearPairs:
    """Search, then require expand() == brute force exactly and the NearPairs invariants."""
    found = near_duplicate_pairs(hashes, threshold)
    expected = brute_force_pairs(hashes, threshold) if brute is None else brute
    got = found.expand()
    assert got.dtype == np.int64 and got.shape[1] == 3
    np.testing.assert_array_equal(got, expected)
    check_invariants(found, hashes, threshold)
    return found


def check_invariants(found: NearPairs, hashes: np.ndarray, threshold: int) -> None:
    """unique/inverse rebuild the input; pairs: u < v, 1 <= d <= t, true distances, sorted, distinct."""
    np.testing.assert_array_equal(found.unique[found.inverse], hashes)
    np.testing.assert_array_equal(found.unique, np.unique(hashes, axis=0).reshape(-1, hashes.shape[1]))
    assert found.inverse.dtype == np.int64 and found.pairs.dtype == np.int64
    u, v, d = found.pairs.T
    assert np.all(u < v) and np.all((d >= 1) & (d <= threshold))
    true_d = np.unpackbits(found.unique[u] ^ found.unique[v], axis=1).sum(axis=1)
    np.testing.assert_array_equal(d, true_d)
    keys = u * max(1, len(found.unique)) + v
    assert np.all(np.diff(keys) > 0), "pairs must be sorted by (u, v) and distinct"


# --- the reference itself -------------------------------------------------------------------------


def test_brute_force_matches_naive_reference() -> None:
    hashes = planted(400, 8, 6, seed=11, fraction=0.3)
    for threshold in (0, 3, 6, 30):
        np.testing.assert_array_equal(brute_force_pairs(hashes, threshold), naive_pairs(hashes, threshold))
    wide = planted(150, 9, 8, seed=12, fraction=0.3)  # multi-word, padded last word
    np.testing.assert_array_equal(brute_force_pairs(wide, 8), naive_pairs(wide, 8))


# --- exact agreement with brute force -------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_20k() -> tuple[np.ndarray, np.ndarray]:
    """20,000 64-bit hashes with near copies and some exact duplicates; brute force at threshold 6."""
    hashes = planted(20_000, 8, 6, seed=1)
    hashes[:200] = hashes[200:400]  # exact duplicates too
    return hashes, brute_force_pairs(hashes, 6)


@pytest.mark.parametrize("threshold", [0, 2, 4, 6])
def test_20k_planted_equals_brute_force(planted_20k: tuple[np.ndarray, np.ndarray], threshold: int) -> None:
    hashes, brute6 = planted_20k
    expected = brute6[brute6[:, 2] <= threshold]
    assert len(expected) >= 200  # the plants make the comparison meaningful
    found, stats = near_duplicate_search(hashes, threshold)
    np.testing.assert_array_equal(found.expand(), expected)
    check_invariants(found, hashes, threshold)
    assert stats.pairs == len(found.pairs)
    if threshold:
        # A real multi-index search (pigeonhole chunks), not all pairs.
        assert stats.n_chunks >= threshold + 1
        assert stats.candidates < stats.n_unique**2 / 200
        # With the whole set as the sample the estimate counts every same-key pair (key-hash
        # truncation may add a handful): more candidates would mean bucketing is wrong.
        assert len(found.pairs) <= stats.candidates <= stats.estimated_candidates + 10


@pytest.mark.parametrize("threshold", [0, 3, 8, 20])
def test_256_bit_hashes_equal_brute_force(threshold: int) -> None:
    check_against_brute_force(planted(4_000, 32, 20, seed=2, fraction=0.1), threshold)


@pytest.mark.parametrize("n_bytes", [1, 2, 3, 5, 9, 16])
def test_other_hash_sizes_and_thresholds(n_bytes: int) -> None:
    n = 600 if n_bytes > 1 else 200
    hashes = planted(n, n_bytes, min(8, n_bytes * 8 - 1), seed=n_bytes, fraction=0.2)
    for threshold in sorted({0, 1, 2, min(5, n_bytes * 8 - 1), n_bytes * 4, n_bytes * 8 - 1}):
        check_against_brute_force(hashes, threshold)


def test_skewed_set_equals_brute_force() -> None:
    hashes = skewed(12_000, seed=3)
    found, stats = near_duplicate_search(hashes, 4)
    np.testing.assert_array_equal(found.expand(), brute_force_pairs(hashes, 4))
    # Blank duplicates collapse to 3 unique rows; the clustered templates still find their pairs.
    assert stats.n_unique < len(hashes) - len(hashes) // 20 + 10
    assert stats.pairs > 100
    assert stats.candidates < stats.n_unique**2 / 50


def test_small_batches_split_big_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch smaller than one bucket's pairs must still give every pair exactly once."""
    hashes = skewed(3_000, seed=4)
    expected = brute_force_pairs(hashes, 5)
    monkeypatch.setattr(hamming, "_BATCH_PAIRS", 7)
    check_against_brute_force(hashes, 5, expected)


def test_popcount_without_bitwise_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy < 2 has no bitwise_count: the lookup-table popcount gives the same results."""
    hashes = planted(2_000, 16, 6, seed=9, fraction=0.2)
    expected = brute_force_pairs(hashes, 6)
    monkeypatch.setattr(hamming, "_HAS_BITWISE_COUNT", False)
    check_against_brute_force(hashes, 6, expected)
    np.testing.assert_array_equal(brute_force_pairs(hashes, 6), expected)


def test_unpacked_pair_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for inputs too large to pack found pairs into one int64 each gives the same result."""
    hashes = skewed(3_000, seed=8)
    expected = brute_force_pairs(hashes, 4)
    monkeypatch.setattr(hamming, "_PACK_LIMIT", 0)
    check_against_brute_force(hashes, 4, expected)
    check_against_brute_force(hashes[:50], 1)


# --- edge cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_hashes(n: int) -> None:
    hashes = np.zeros((n, 8), dtype=np.uint8)
    found = near_duplicate_pairs(hashes, 4)
    assert found.pairs.shape == (0, 3) and found.expand().shape == (0, 3)
    assert found.unique.shape == (n, 8) and len(found.inverse) == n
    assert brute_force_pairs(hashes, 4).shape == (0, 3)


def test_no_hashes_at_all() -> None:
    found = near_duplicate_pairs(pack_hashes([]), 4)
    assert found.pairs.shape == (0, 3) and found.expand().shape == (0, 3) and len(found.inverse) == 0


def test_all_identical_hashes() -> None:
    hashes = np.tile(np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint8), (300, 1))
    found, stats = near_duplicate_search(hashes, 4)
    assert found.unique.shape == (1, 8) and np.all(found.inverse == 0)
    assert stats.candidates == 0 and len(found.pairs) == 0
    expanded = found.expand()
    assert len(expanded) == 300 * 299 // 2 and np.all(expanded[:, 2] == 0)
    np.testing.assert_array_equal(expanded, brute_force_pairs(hashes, 4))


def test_identical_groups_near_each_other() -> None:
    a = np.zeros(8, dtype=np.uint8)
    b = a.copy()
    b[7] = 0b11  # 2 bits from a
    c = np.full(8, 255, dtype=np.uint8)  # far from both
    hashes = np.stack([a, b, a, c, b, b, a, c])
    found = check_against_brute_force(hashes, 2)
    np.testing.assert_array_equal(found.pairs, [[0, 1, 2]])
    assert len(found.expand()) == 3 * 3 + 3 + 3 + 1  # a x b, within a, within b, within c
    assert len(near_duplicate_pairs(hashes, 1).expand()) == 3 + 3 + 1


def test_largest_threshold_gives_all_pairs() -> None:
    hashes = planted(300, 2, 4, seed=5)
    found = check_against_brute_force(hashes, 15)
    assert len(found.expand()) == 300 * 299 // 2


def test_deterministic_and_order_independent() -> None:
    hashes = skewed(5_000, seed=6)
    first, second = near_duplicate_pairs(hashes, 4), near_duplicate_pairs(hashes.copy(), 4)
    for name in ("unique", "inverse", "pairs"):
        assert getattr(first, name).tobytes() == getattr(second, name).tobytes()
    # Unique rows are in sorted order, so shuffling the input gives the same unique-level pairs.
    shuffled = near_duplicate_pairs(hashes[np.random.default_rng(0).permutation(len(hashes))], 4)
    np.testing.assert_array_equal(shuffled.unique, first.unique)
    np.testing.assert_array_equal(shuffled.pairs, first.pairs)


def test_results_are_read_only() -> None:
    found = near_duplicate_pairs(planted(100, 8, 3, seed=7, fraction=0.3), 3)
    with pytest.raises(ValueError):
        found.pairs[0, 0] = 5


@pytest.mark.parametrize(
    ("hashes", "threshold"),
    [
        (np.zeros((5, 8), dtype=np.uint8), -1),
        (np.zeros((5, 8), dtype=np.uint8), 64),
        (np.zeros((5, 8), dtype=np.uint8), 2.0),
        (np.zeros((5, 8), dtype=np.int64), 2),
        (np.zeros(8, dtype=np.uint8), 2),
        (np.zeros((5, 0), dtype=np.uint8), 0),
    ],
)
def test_bad_input_is_rejected(hashes: np.ndarray, threshold: int) -> None:
    with pytest.raises(ValueError):
        near_duplicate_pairs(hashes, threshold)
    with pytest.raises(ValueError):
        brute_force_pairs(hashes, threshold)


# --- real imagehash output ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """A few skimage sample images, each with near-duplicate edits (brightness, blur, crop, resize)."""
    from skimage import data

    originals = [data.camera(), data.coins(), data.moon(), data.chelsea(), data.coffee(), data.horse()]
    result = []
    for array in originals:
        image = Image.fromarray((array * 255).astype(np.uint8) if array.dtype == bool else array)
        w, h = image.size
        result += [
            image,
            ImageEnhance.Brightness(image).enhance(1.15),
            image.filter(ImageFilter.GaussianBlur(1.5)),
            image.crop((w // 50, h // 50, w - w // 50, h - h // 50)),
            image.resize((w // 2, h // 2)),
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        ]
    return result


@pytest.mark.parametrize(
    ("hash_function", "hash_size", "threshold"),
    [(imagehash.phash, 8, 10), (imagehash.dhash, 8, 10), (imagehash.phash, 16, 40), (imagehash.phash, 6, 6)],
)
def test_imagehash_output(images: list[Image.Image], hash_function, hash_size: int, threshold: int) -> None:
    hashes = [hash_function(image, hash_size=hash_size) for image in images]
    packed = pack_hashes([str(h) for h in hashes])
    assert packed.dtype == np.uint8 and packed.shape == (len(images), -(-hash_size * hash_size // 8))
    # pack_hashes keeps imagehash's bits: every pairwise distance equals imagehash's own h1 - h2.
    expected = [
        (i, j, hashes[i] - hashes[j])
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if hashes[i] - hashes[j] <= threshold
    ]
    all_pairs = brute_force_pairs(packed, hash_size * hash_size - 1)
    for i, j, d in all_pairs:
        assert d == hashes[i] - hashes[j]
    found = near_duplicate_pairs(packed, threshold)
    np.testing.assert_array_equal(found.expand(), np.array(expected, dtype=np.int64).reshape(-1, 3))
    # The edited copies of each image are found (the comparison is not vacuous).
    assert len(expected) >= len(images) // 3


def test_pack_hashes_bits_and_errors() -> None:
    packed = pack_hashes(["00ff", "8001", "ffff"])
    np.testing.assert_array_equal(packed, [[0x00, 0xFF], [0x80, 0x01], [0xFF, 0xFF]])
    np.testing.assert_array_equal(pack_hashes(["abc", "001"]), [[0x0A, 0xBC], [0x00, 0x01]])
    assert pack_hashes([]).shape == (0, 0)
    hashes = [imagehash.hex_to_hash("0123456789abcdef"), imagehash.hex_to_hash("0123456789abcdee")]
    assert brute_force_pairs(pack_hashes([str(h) for h in hashes]), 1)[0, 2] == hashes[0] - hashes[1] == 1
    with pytest.raises(ValueError):
        pack_hashes(["00ff", "00f"])
    with pytest.raises(ValueError):
        pack_hashes(["zz"])
    with pytest.raises(ValueError):
        pack_hashes(["00 f", "00ff"])


def _across_by_brute_force(hashes: np.ndarray, others: np.ndarray, threshold: int) -> set:
    both = brute_force_pairs(np.concatenate([hashes, others]), threshold)
    n = len(hashes)
    return {(int(i), int(j) - n, int(d)) for i, j, d in both if i < n <= j}


def _across_found(found, n_others: int) -> set:
    out = set()
    for u, w, d in found.across:
        for i in np.flatnonzero(found.inverse == u):
            for j in np.flatnonzero(found.other_inverse == w):
                out.add((int(i), int(j), int(d)))
    return out


@pytest.mark.parametrize(("threshold", "n_bytes"), [(0, 8), (3, 8), (4, 8), (6, 4), (10, 32)])
def test_others_give_every_cross_pair_and_no_pair_between_two_others(threshold, n_bytes):
    rng = np.random.default_rng(threshold)
    hashes = rng.integers(0, 256, size=(1500, n_bytes), dtype=np.uint8)
    others = rng.integers(0, 256, size=(2500, n_bytes), dtype=np.uint8)
    others[:600] = hashes[rng.integers(0, 1500, 600)]  # equal to a hash ...
    bit = rng.integers(0, n_bytes * 8, 300)
    others[np.arange(300), bit // 8] ^= (1 << (bit % 8)).astype(np.uint8)  # ... or a bit away
    hashes[-30:] = hashes[:30]  # identical hashes on each side
    others[-30:] = others[:30]
    found, stats = near_duplicate_search(hashes, threshold, others)
    assert _across_found(found, len(others)) == _across_by_brute_force(hashes, others, threshold)
    alone = near_duplicate_pairs(hashes, threshold)
    assert np.array_equal(found.pairs, alone.pairs)  # the others change no pair among hashes
    assert stats.n_others == len(others) and stats.across == len(found.across) > 0


def test_others_of_another_width_are_refused():
    with pytest.raises(ValueError, match="bytes a hash"):
        near_duplicate_pairs(np.zeros((3, 8), np.uint8), 4, np.zeros((2, 4), np.uint8))


@pytest.mark.parametrize("threshold", [2, 6])
def test_a_memory_budget_gives_the_same_pairs_in_partitions_and_one_pass_at_a_time(
    planted_20k: tuple[np.ndarray, np.ndarray], threshold: int
) -> None:
    """Under a budget smaller than a key's pass, the keys run one at a time, each in hash
    partitions of its key values: the pairs, and the pairs with others, are those found without."""
    hashes, brute6 = planted_20k
    others = hashes[::7] ^ np.uint8(1)
    free = near_duplicate_search(hashes, threshold, others)[0]
    # 1 MB holds less than one pass of these 22,858 hashes (48 bytes each): one key at a time, in
    # 5 partitions (at least 4,096 hashes each)
    tight = near_duplicate_search(hashes, threshold, others, memory_mb=1)[0]
    np.testing.assert_array_equal(tight.pairs, free.pairs)
    np.testing.assert_array_equal(tight.across, free.across)
    np.testing.assert_array_equal(tight.expand(), brute6[brute6[:, 2] <= threshold])
