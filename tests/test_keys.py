"""(source, id) keys sorted once and looked up slice after slice (photoprep.dataset.keys)."""

import numpy as np
import pandas as pd
import pytest

from photoprep.dataset import keys

# Parts that a join could confuse: a NUL inside an id, an id that starts with the other's tail,
# empty texts, long ids, missing values.
SOURCES = np.array(["s", "sa", "t", "", None], dtype=object)
IDS = np.array(["ab", "b", "", "a\0", "\0ab", "x" * 40, "x" * 41, None], dtype=object)


def _key(source, id_):
    """What a key means: the pair, with a missing part making the one missing key (as Arrow's
    hash kernels match a null to a null)."""
    return None if pd.isna(source) or pd.isna(id_) else (source, id_)


@pytest.mark.parametrize("seed", range(4))
def test_the_first_row_and_the_rows_held_are_those_of_the_pairs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        n, m = (int(v) for v in rng.integers(0, 30, 2))
        reference = pd.DataFrame({"source": rng.choice(SOURCES, n), "id": rng.choice(IDS, n)})
        frame = pd.DataFrame({"source": rng.choice(SOURCES, m), "id": rng.choice(IDS, m)})
        ref_keys = [_key(s, i) for s, i in zip(reference["source"], reference["id"], strict=True)]
        frame_keys = [_key(s, i) for s, i in zip(frame["source"], frame["id"], strict=True)]
        first: dict = {}
        for row, key in enumerate(ref_keys):
            first.setdefault(key, row)
        sorted_keys = keys.SortedKeys(reference)
        assert sorted_keys.first_rows(frame).tolist() == [first.get(k, -1) for k in frame_keys]
        held = np.zeros(n, dtype=bool)
        sorted_keys.mark_held(frame, held)
        assert held.tolist() == [k in set(frame_keys) for k in ref_keys]


def test_keys_of_a_nul_in_an_id_stay_apart():
    reference = pd.DataFrame({"source": ["s", "s", "sa"], "id": ["a\0b", "a\0c", "\0b"]})
    frame = pd.DataFrame({"source": ["s", "s", "s", "sa"], "id": ["a\0c", "a", "a\0b", "\0b"]})
    assert keys.SortedKeys(reference).first_rows(frame).tolist() == [1, -1, 0, 2]
