"""photoprep.images.graph: the components dedup and bucket group by, against scipy's."""

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from photoprep.images.graph import components


def scipy_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("n", "edges"), [(1, 0), (10, 3), (200, 150), (2000, 1990), (5000, 20000)])
def test_labels_equal_scipys_on_random_graphs(seed, n, edges):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, edges), rng.integers(0, n, edges)
    got = components(n, a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, scipy_components(n, a, b))


def test_long_chains_in_shuffled_order_end_in_one_component():
    n = 10_000
    order = np.random.default_rng(0).permutation(n)
    got = components(n, order[:-1], order[1:])
    assert (got == 0).all()


def test_no_nodes_no_edges_and_self_loops():
    assert components(0, [], []).shape == (0,)
    np.testing.assert_array_equal(components(4, [], []), [0, 1, 2, 3])
    np.testing.assert_array_equal(components(3, [2, 1], [2, 1]), [0, 1, 2])
    np.testing.assert_array_equal(components(5, [4], [1]), [0, 1, 2, 3, 1])


def test_edges_outside_the_graph_are_refused():
    with pytest.raises(ValueError, match="outside"):
        components(3, [0], [3])
    with pytest.raises(ValueError, match="differ in length"):
        components(3, [0, 1], [1])
