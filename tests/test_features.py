"""photoprep.features against the per-image skimage / OpenCV computation it replaces."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import skimage.data
from pydantic import ValidationError
from skimage.color import rgb2gray
from skimage.feature import hog
from sklearn.datasets import load_digits

from photoprep.errors import UserError
from photoprep.images.features import (
    angle_bins,
    color_map_batch,
    compute_features,
    feature_info,
    gray_batch,
    hog_batch,
    orientation_bins,
    reference_features,
)
from photoprep.params import FeatureParams, HogParams

TOL = 1e-5
NORMS = ["L1", "L1-sqrt", "L2", "L2-Hys"]
# (pixels_per_cell, cells_per_block, orientations): the default; small cells; odd, non-square
# cells with a bin width (180/7) that is not a whole number; 45-degree bin edges, which gradients
# with |g_row| == |g_col| hit exactly.
HOG_SETTINGS = [((8, 8), (3, 3), 9), ((4, 4), (2, 2), 8), ((7, 5), (2, 3), 7), ((6, 6), (1, 1), 4)]
SIZES = [(64, 64), (32, 32), (96, 64), (45, 70)]


def _photos(hw: tuple[int, int]) -> np.ndarray:
    """Real photos from skimage.data, shrunk to ``hw`` = (H, W): uint8 N x H x W x 3."""
    rgbs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    camera = skimage.data.camera()
    rgbs.append(np.repeat(camera[:, :, None], 3, axis=2))
    return np.stack([cv2.resize(im, hw[::-1], interpolation=cv2.INTER_AREA) for im in rgbs])


def _crops(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` different uint8 images of ``hw``: random crops of real photos, shrunk."""
    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        top, left = rng.integers(0, im.shape[0] // 2), rng.integers(0, im.shape[1] // 2)
        out.append(cv2.resize(im[top:, left:], hw[::-1], interpolation=cv2.INTER_AREA))
    return np.stack(out)


def _digits() -> np.ndarray:
    """sklearn digits (8x8, 0..16) blown up to 32x32 grays in [0, 1]: flat areas and hard edges."""
    images = load_digits().images[:12] / 16.0
    return np.kron(images, np.ones((4, 4)))


def _skimage_hogs(gray: np.ndarray, p: HogParams) -> np.ndarray:
    args = (p.orientations, p.pixels_per_cell, p.cells_per_block, p.block_norm)
    return np.stack([hog(g, *args, feature_vector=True) for g in gray])


# --------------------------------------------------------------------------- gray, colour


@pytest.mark.parametrize("hw", SIZES)
def test_gray_batch_is_rgb2gray_bit_for_bit(hw):
    rgb = _photos(hw)
    expected = np.stack([rgb2gray(im) for im in rgb])
    got = gray_batch(rgb)
    assert got.dtype == np.float64
    assert np.array_equal(got, expected)


def test_gray_batch_rejects_non_rgb():
    with pytest.raises(ValueError, match="N x H x W x 3"):
        gray_batch(np.zeros((2, 8, 8), dtype=np.uint8))


@pytest.mark.parametrize("size", [(6, 10), (4, 4), (9, 7)])
def test_color_map_batch_matches_per_image_opencv(size):
    rgb = _photos((64, 64))
    h, w = size
    expected = [
        cv2.cvtColor(cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2YCrCb)[:, :, 1:]
        .astype(np.float32)
        .ravel()
        for im in rgb
    ]
    got = color_map_batch(rgb, size)
    assert got.dtype == np.float32 and got.shape == (len(rgb), h * w * 2)
    assert np.array_equal(got, np.stack(expected))
    # Cr and Cb interleave per pixel, as ravel of (h, w, 2) does; a gray image sits at 128.
    camera = color_map_batch(rgb[-1:], size).reshape(h, w, 2)
    assert np.all(camera == 128)


# --------------------------------------------------------------------------- HOG parity


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("norm", NORMS)
def test_hog_batch_matches_skimage_on_photos(hw, norm):
    gray = gray_batch(_photos(hw))
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
    gray = gray_batch(_photos((64, 64))).astype(np.float32)
    p = HogParams()
    got = hog_batch(gray, p)
    assert got.dtype == np.float32
    assert np.abs(got - _skimage_hogs(gray, p)).max() <= TOL


def test_hog_batch_is_not_trivially_equal():
    # Guard against a parity test that passes on zeros: the vectors differ between images
    # and between block norms.
    gray = gray_batch(_photos((64, 64)))
    l1 = hog_batch(gray, HogParams(block_norm="L1"))
    hys = hog_batch(gray, HogParams(block_norm="L2-Hys"))
    assert np.abs(l1[0] - l1[1]).max() > 0.05
    assert np.abs(l1 - hys).max() > 0.05
    assert hys.max() <= 1.0 and hys.min() >= 0.0


def test_hog_impl_skimage_is_the_loop():
    gray = gray_batch(_photos((32, 32)))
    p = HogParams(pixels_per_cell=(4, 4), impl="skimage")
    assert np.array_equal(hog_batch(gray, p), _skimage_hogs(gray, p))


def test_hog_batch_too_small_image():
    with pytest.raises(ValueError, match="too small"):
        hog_batch(np.zeros((1, 16, 16)), HogParams())


def test_hog_batch_empty_batch():
    assert hog_batch(np.zeros((0, 64, 64)), HogParams()).shape == (0, 2916)


# --------------------------------------------------------------------------- compute_features


@pytest.mark.parametrize("scaling", ["original", "standard", "none"])
def test_compute_features_matches_reference(scaling):
    images = _crops(24, (64, 64))
    p = FeatureParams(scaling=scaling)
    got, info = compute_features(images, p, batch_size=10)
    expected = reference_features(images, p)
    assert got.dtype == np.float32 and got.shape == (24, 2916 + 120)
    assert np.abs(got - expected).max() <= TOL
    assert info["scaling"] == scaling


def test_compute_features_other_shape_and_params_match_reference():
    images = _crops(9, (48, 80), seed=3)
    p = FeatureParams(
        hog=HogParams(orientations=7, pixels_per_cell=(6, 5), cells_per_block=(2, 2), block_norm="L1-sqrt"),
        color_size=(3, 5),
    )
    got, info = compute_features(images, p)
    assert got.shape == (9, info["dim"])
    assert np.abs(got - reference_features(images, p)).max() <= TOL


def test_original_scaling_is_the_dec_formula():
    images = _crops(3, (64, 64))
    p = FeatureParams()
    got, info = compute_features(images, p)
    arr = images[1]
    h = hog(rgb2gray(arr), 9, (8, 8), (3, 3), "L2-Hys", feature_vector=True)
    ycrcb = cv2.cvtColor(cv2.resize(arr, (10, 6), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2YCrCb)
    crcb = ycrcb[:, :, 1:].astype(np.float32)
    expected = np.concatenate([(h - 0.2) * 10, ((crcb - 128) / 10).ravel()]).astype(np.float32)
    assert np.abs(got[1] - expected).max() <= TOL
    start = info["color"]["offset"]
    assert np.array_equal(got[1, start:], ((crcb - 128) / 10).ravel())


def test_standard_scaling_z_scores_columns():
    images = _crops(30, (32, 32))
    small_cells = HogParams(pixels_per_cell=(4, 4))
    got, info = compute_features(images, FeatureParams(hog=small_cells, scaling="standard"))
    raw, _ = compute_features(images, FeatureParams(hog=small_cells, scaling="none"))
    varying = raw.std(axis=0) > 0
    assert np.abs(got.mean(axis=0)).max() < 1e-4
    assert np.allclose(got[:, varying].std(axis=0), 1.0, atol=1e-3)
    assert np.all(got[:, ~varying] == 0)
    assert info["standard"]["constant_columns"] == int((~varying).sum())


def test_n_jobs_does_not_change_a_byte(tmp_path):
    images = _crops(40, (64, 64), seed=1)
    p = FeatureParams()
    one, info_one = compute_features(images, p, n_jobs=1, batch_size=8)
    two, info_two = compute_features(images, p, n_jobs=2, batch_size=8)
    assert one.tobytes() == two.tobytes()
    assert info_one == info_two
    # A memmap (as the bucket stage writes) gives the same bytes too, in workers or not.
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    assert compute_features(mapped, p, n_jobs=2, batch_size=8)[0].tobytes() == one.tobytes()
    assert compute_features(mapped, p, n_jobs=1, batch_size=40)[0].tobytes() == one.tobytes()


def test_info_describes_the_vector():
    images = _crops(2, (96, 64))
    got, info = compute_features(images, FeatureParams())
    json.dumps(info)  # must be serialisable as is
    # 96 x 64 pixels -> 12 x 8 cells -> 10 x 6 blocks of 3 x 3 cells x 9 orientations.
    assert info["image_size"] == [96, 64]
    assert info["hog"]["shape"] == [10, 6, 3, 3, 9]
    assert info["hog"]["offset"] == 0 and info["hog"]["length"] == 10 * 6 * 81
    assert info["hog"]["block_length"] == 81
    assert info["color"] == {
        "offset": 4860,
        "length": 120,
        "shape": [6, 10, 2],
        "space": "YCrCb",
        "channels": ["Cr", "Cb"],
    }
    assert info["dim"] == got.shape[1] == 4860 + 120
    # The HOG part reshapes to the recorded grid and is skimage's unflattened output.
    grid = (got[0, : info["hog"]["length"]] / 10 + 0.2).reshape(info["hog"]["shape"])
    full = hog(rgb2gray(images[0]), 9, (8, 8), (3, 3), "L2-Hys", feature_vector=False)
    assert np.abs(grid - full).max() <= 1e-5


def test_empty_input_gives_empty_matrix():
    got, info = compute_features(np.zeros((0, 64, 64, 3), dtype=np.uint8), FeatureParams(scaling="standard"))
    assert got.shape == (0, info["dim"]) and got.dtype == np.float32


def test_images_too_small_is_a_user_error():
    with pytest.raises(UserError, match=r"features.hog: .*too small"):
        compute_features(np.zeros((2, 16, 16, 3), dtype=np.uint8), FeatureParams())


def test_bad_images_are_a_user_error():
    with pytest.raises(UserError, match="uint8 N x H x W x 3"):
        compute_features(np.zeros((2, 64, 64), dtype=np.uint8), FeatureParams())


def test_opencv_impl_is_a_clear_user_error():
    p = FeatureParams(hog=HogParams(impl="opencv"))
    images = _crops(2, (64, 64))
    with pytest.raises(UserError, match=r"features.hog.impl: opencv"):
        compute_features(images, p)
    with pytest.raises(UserError, match="opencv"):
        hog_batch(gray_batch(images), p.hog)
    if not hasattr(cv2, "HOGDescriptor"):
        with pytest.raises(UserError, match="HOGDescriptor"):
            compute_features(images, p)


def test_unknown_impl_is_rejected_by_params():
    with pytest.raises(ValidationError):
        HogParams(impl="cuda")


def test_feature_info_without_images():
    info = feature_info((64, 64), FeatureParams())
    assert info["dim"] == 3036 and info["hog"]["impl"] == "numpy"


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
