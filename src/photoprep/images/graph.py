"""Connected components of an undirected graph given as edge lists, in numpy alone.

Dedup joins duplicate pairs into groups and bucket joins nearby resolutions into buckets; both
need only the components. Labels number the components in the order of their smallest node
(what `scipy.sparse.csgraph.connected_components` gives), so results do not depend on which
implementation ran. Kept out of scipy so that a stage does not pay for importing scipy.sparse
(about 0.1-0.2 s at each start).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def components(n: int, src: ArrayLike, dst: ArrayLike) -> np.ndarray:
    """Component label (int32, 0..k-1, ordered by each component's smallest node) of nodes 0..n-1.

    Min-label hooking with pointer jumping: each round hooks the root of every edge's larger
    label under the smaller one, then shortens every path to its root. The sum of the labels
    falls every round, so it ends; it ends when every edge joins equal labels.
    """
    a = np.asarray(src, dtype=np.int64).ravel()
    b = np.asarray(dst, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"src and dst differ in length: {a.shape[0]} and {b.shape[0]}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"an edge names a node outside 0..{n - 1}")
    labels = np.arange(n, dtype=np.int64)
    while True:
        la, lb = labels[a], labels[b]
        low = np.minimum(la, lb)
        hooked = labels.copy()
        np.minimum.at(hooked, la, low)
        np.minimum.at(hooked, lb, low)
        while True:
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, labels):
            break
        labels = hooked
    # Every label is now the smallest node of its component: np.unique's sorted order numbers
    # the components by their smallest node.
    return np.unique(labels, return_inverse=True)[1].astype(np.int32)
