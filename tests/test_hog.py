"""photoprep.images.hog against scikit-image's per-image `hog` and `rgb2gray` it reproduces."""

from __future__ import annotations

import numpy as np
import pytest
from pictures import shrunk_crops, shrunk_photos
from skimage.color import rgb2gray
from skimage.feature import hog
from sklearn.datasets import load_digits

from photoprep.core.params import HogParams
from photoprep.images import hog as hog_module
from photoprep.images.hog import angle_bins, gray_batch, hog_batch, hog_of_rgb, orientation_bins

TOL = 1e-5


NORMS = ["L1", "L1-sqrt", "L2", "L2-Hys"]
# (pixels_per_cell, cells_per_block, orientations): the default; small cells; odd, non-square
# cells with a bin width (180/7) that is not a whole number; 45-degree bin edges, which gradients
# with |g_row| == |g_col| hit exactly.


HOG_SETTINGS = [((8, 8), (3, 3), 9), ((4, 4), (2, 2), 8), ((7, 5), (2, 3), 7), ((6, 6), (1, 1), 4)]


SIZES = [(64, 64), (32, 32), (96, 64), (45, 70)]


def _digits() -> np.ndarray:
    """sklearn digits (8x8, 0..16) blown up to 32x32 grays in [0, 1]: flat areas and hard edges."""
    images = load_digits().images[:12] / 16.0
    return np.kron(images, np.ones((4, 4)))


def _skimage_hogs(gray: np.ndarray, p: HogParams) -> np.ndarray:
    args = (p.orientations, p.pixels_per_cell, p.cells_per_block, p.block_norm)
    return np.stack([hog(g, *args, feature_vector=True) for g in gray])


@pytest.mark.parametrize("hw", SIZES)
def test_gray_batch_is_rgb2gray_bit_for_bit(hw):
    rgb = shrunk_photos(hw)
    expected = np.stack([rgb2gray(im) for im in rgb])
    got = gray_batch(rgb)
    assert got.dtype == np.float64
    assert np.array_equal(got, expected)


def test_gray_batch_rejects_non_rgb():
    with pytest.raises(ValueError, match="N x H x W x 3"):
        gray_batch(np.zeros((2, 8, 8), dtype=np.uint8))


# --------------------------------------------------------------------------- HOG parity


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("norm", NORMS)
def test_hog_batch_matches_skimage_on_photos(hw, norm):
    gray = gray_batch(shrunk_photos(hw))
    checked = 0
    for ppc, cpb, n in HOG_SETTINGS:
        p = HogParams(orientations=n, pixels_per_cell=ppc, cells_per_block=cpb, block_norm=norm)
        if hw[0] < ppc[0] * cpb[0] or hw[1] < ppc[1] * cpb[1]:
            continue
        expected = _skimage_hogs(gray, p)
        got = hog_batch(gray, p)
        assert got.shape == expected.shape and got.dtype == np.float64
        assert np.abs(got - expected).max() <= TOL, (ppc, cpb, n)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("norm", NORMS)
def test_hog_batch_matches_skimage_on_digits(norm):
    gray = _digits()
    for ppc, cpb, n in HOG_SETTINGS:
        p = HogParams(orientations=n, pixels_per_cell=ppc, cells_per_block=cpb, block_norm=norm)
        assert np.abs(hog_batch(gray, p) - _skimage_hogs(gray, p)).max() <= TOL, (ppc, cpb, n)


def test_hog_batch_float32_input_stays_float32_like_skimage():
    gray = gray_batch(shrunk_photos((64, 64))).astype(np.float32)
    p = HogParams()
    got = hog_batch(gray, p)
    assert got.dtype == np.float32
    assert np.abs(got - _skimage_hogs(gray, p)).max() <= TOL


def test_hog_batch_is_not_trivially_equal():
    # Guard against a parity test that passes on zeros: the vectors differ between images
    # and between block norms.
    gray = gray_batch(shrunk_photos((64, 64)))
    l1 = hog_batch(gray, HogParams(block_norm="L1"))
    hys = hog_batch(gray, HogParams(block_norm="L2-Hys"))
    assert np.abs(l1[0] - l1[1]).max() > 0.05
    assert np.abs(l1 - hys).max() > 0.05
    assert hys.max() <= 1.0 and hys.min() >= 0.0


@pytest.mark.parametrize("norm", NORMS)
def test_hog_of_rgb_sums_many_images_at_a_time_to_the_same_bytes_as_one_at_a_time(norm):
    # The cell sums run SUM_IMAGES images at a time, the rest 16 at a time: counts that end
    # inside a step or a sum, against each image alone (where both are one image).
    n = hog_module.SUM_IMAGES + 19
    rgb = shrunk_crops(n, (45, 70))
    p = HogParams(block_norm=norm, pixels_per_cell=(7, 5), cells_per_block=(2, 3), orientations=7)
    alone = np.concatenate([hog_batch(gray_batch(rgb[i : i + 1]), p) for i in range(n)])
    for count in (1, 17, hog_module.SUM_IMAGES, n):
        got = hog_of_rgb(rgb[:count], p)
        assert got.tobytes() == alone[:count].tobytes(), count
        assert got.tobytes() == hog_batch(gray_batch(rgb[:count]), p).tobytes(), count
    assert np.abs(alone[0] - alone[1]).max() > 0.05  # not a parity of zeros


def test_hog_impl_skimage_is_the_loop():
    gray = gray_batch(shrunk_photos((32, 32)))
    p = HogParams(pixels_per_cell=(4, 4), impl="skimage")
    assert np.array_equal(hog_batch(gray, p), _skimage_hogs(gray, p))


def test_hog_batch_too_small_image():
    with pytest.raises(ValueError, match="too small"):
        hog_batch(np.zeros((1, 16, 16)), HogParams())


def test_hog_batch_empty_batch():
    assert hog_batch(np.zeros((0, 64, 64)), HogParams()).shape == (0, 2916)


def _edge_ramps(n: int) -> np.ndarray:
    """64x64 grays whose 8x8 cells are linear ramps at angles on (or next to) HOG bin edges.

    Their gradients land within rounding of ``180/n * k``, the cases where the bin of a pixel
    hangs on the last bit of its angle; also 0 and 180 degrees, which wrap around.
    """
    rows, cols = np.mgrid[0:64, 0:64].astype(np.float64)
    images = []
    for nudge in (0.0, 1e-12, -1e-12):
        gray = np.empty((64, 64))
        for i in range(8):
            for j in range(8):
                k = (i * 8 + j) % (n + 1)
                theta = np.deg2rad(180.0 / n * k + nudge)
                cell = np.s_[8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
                gray[cell] = 0.5 + 0.004 * (np.sin(theta) * rows[cell] + np.cos(theta) * cols[cell])
        images.append(gray)
    return np.stack(images)


@pytest.mark.parametrize("n", [4, 6, 7, 9])
@pytest.mark.parametrize("norm", NORMS)
def test_hog_batch_matches_skimage_on_bin_edges(n, norm):
    gray = _edge_ramps(n)
    p = HogParams(orientations=n, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm=norm)
    assert np.abs(hog_batch(gray, p) - _skimage_hogs(gray, p)).max() <= TOL


@pytest.mark.parametrize("n", list(range(2, 41)))
def test_angle_bins_follow_skimage_edges_to_the_last_bit(n):
    # Every bin edge as skimage forms it, (180. / n) * i, and its 30 neighbours either side.
    edges = 180.0 / n * np.arange(n + 1, dtype=np.float64)
    angles = [edges]
    for direction in (np.inf, -np.inf):
        x = edges
        for _ in range(30):
            x = np.nextafter(x, direction)
            angles.append(x)
    angle = np.concatenate([*angles, np.array([0.0, 180.0, 179.99999999999997])])
    angle = angle[(angle >= 0) & (angle <= 180)]
    # skimage: pixel in bin i iff not (angle >= start_i or angle < end_i).
    expected = np.full(angle.shape, n)
    for i in range(n):
        inside = (angle < 180.0 / n * (i + 1)) & (angle >= 180.0 / n * i)
        expected[inside] = i
    assert np.array_equal(angle_bins(angle, n), expected)


def test_orientation_bins_wrap_like_skimage_modulo():
    rng = np.random.default_rng(5)
    tiny = [0.0, -0.0, 1e-300, -1e-300, 1e-17, -1e-17]
    specials = np.array([(r, c) for r in [*tiny, 1.0, -1.0] for c in [*tiny, 1.0, -1.0]]).T
    g_row = np.concatenate([specials[0], rng.normal(size=5000), rng.normal(size=500) * 1e-16])
    g_col = np.concatenate([specials[1], rng.normal(size=5000), -np.abs(rng.normal(size=500))])
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180  # skimage's expression
    for n in (4, 7, 9):
        expected = np.searchsorted(180.0 / n * np.arange(1, n + 1), angle, side="right")
        assert np.array_equal(orientation_bins(g_row, g_col, n), expected)
