"""(source, id) keys of a reference table, sorted once and looked up by binary search, slice
after slice.

A key is the text ``source + NUL + id`` (Arrow's strings keep their length, so a NUL is a byte
like another): a source is a folder's name, which never holds NUL, so two keys are equal only if
both parts are. A row whose source or id is missing has the one key `MISSING`, the empty text
(no NUL: no other key is it), as Arrow's hash kernels, which this replaces, match a null to a
null.

The split stage looks up every slice of the images table in the sources' labels and in dedup's
group members. Arrow's ``index_in`` and ``is_in`` build a hash table of the whole reference on
every call, so a table read in many small slices paid for the whole reference once a slice; the
keys sorted once (Arrow's stable ``sort_indices``) answer a slice with ``search_sorted``, in its
own size times log(reference).

Why by hand: Arrow sorts and searches; what it keeps no structure for between calls is a hash
lookup, and pandas' (an Index engine) holds a Python object a key (72 MB at 144,564 keys,
`photoprep.images.memo`). This module builds the keys, keeps the order, and gives the first row
of a repeated key or every row of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TEXT = pa.large_string()
MISSING = ""


def key_array(frame: pd.DataFrame) -> pa.Array:
    """The key of each row of `frame` (its source and id columns)."""
    parts = [pa.array(frame[c].astype(str), from_pandas=True).cast(TEXT) for c in ("source", "id")]
    return pc.binary_join_element_wise(*parts, pa.scalar("\0", TEXT)).fill_null(MISSING)


class SortedKeys:
    """The keys of `reference` sorted once: which row of it holds each key of a slice, and which
    of its rows a slice holds."""

    def __init__(self, reference: pd.DataFrame) -> None:
        keys = key_array(reference)
        order = pc.sort_indices(keys)  # stable: equal keys keep their rows' order
        self.keys = keys.take(order)
        self.rows = order.to_numpy().astype(np.int64)

    def _ranges(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        keys = key_array(frame)
        first, last = (pc.search_sorted(self.keys, keys, side=side) for side in ("left", "right"))
        return first.to_numpy().astype(np.int64), last.to_numpy().astype(np.int64)

    def first_rows(self, frame: pd.DataFrame) -> np.ndarray:
        """The first row of the reference with each row's key, -1 where none has it."""
        first, last = self._ranges(frame)
        out = np.full(len(frame), -1, dtype=np.int64)
        found = last > first
        out[found] = self.rows[first[found]]
        return out

    def mark_held(self, frame: pd.DataFrame, held: np.ndarray) -> None:
        """Set `held` (a bool per row of the reference) where some row of `frame` has the key."""
        first, last = self._ranges(frame)
        lengths = last - first  # a repeated key of the reference: every row of it
        # The positions of every [first, last) range, one after another.
        offsets = np.repeat(first - (np.cumsum(lengths) - lengths), lengths)
        held[self.rows[np.arange(len(offsets)) + offsets]] = True
