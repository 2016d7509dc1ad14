"""photoprep.images.features: the feature vector against the per-image skimage / OpenCV computation it
replaces, and the features' chunks written from the memo equal to the in-memory result, adding
images computing the features of the new ones only."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pictures import shrunk_crops, shrunk_photos
from pydantic import ValidationError
from skimage.color import rgb2gray
from skimage.feature import hog

from photoprep.core import chunked
from photoprep.core.errors import UserError
from photoprep.core.params import ComputeParams, FeatureParams, HogParams
from photoprep.images import features, memo
from photoprep.images.features import (
    color_map_batch,
    column_moments,
    compute_features,
    feature_info,
    reference_features,
)
from photoprep.images.hog import gray_batch, hog_batch

TOL = 1e-5


@pytest.mark.parametrize("size", [(6, 10), (4, 4), (9, 7)])
def test_color_map_batch_matches_per_image_opencv(size):
    rgb = shrunk_photos((64, 64))
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


# --------------------------------------------------------------------------- compute_features


@pytest.mark.parametrize("scaling", ["original", "standard", "none"])
def test_compute_features_matches_reference(scaling):
    images = shrunk_crops(24, (64, 64))
    p = FeatureParams(scaling=scaling)
    got, info = compute_features(images, p, batch_size=10)
    expected = reference_features(images, p)
    assert got.dtype == np.float32 and got.shape == (24, 2916 + 120)
    assert np.abs(got - expected).max() <= TOL
    assert info["scaling"] == scaling


def test_compute_features_other_shape_and_params_match_reference():
    images = shrunk_crops(9, (48, 80), seed=3)
    p = FeatureParams(
        hog=HogParams(orientations=7, pixels_per_cell=(6, 5), cells_per_block=(2, 2), block_norm="L1-sqrt"),
        color_size=(3, 5),
    )
    got, info = compute_features(images, p)
    assert got.shape == (9, info["dim"])
    assert np.abs(got - reference_features(images, p)).max() <= TOL


def test_original_scaling_is_the_dec_formula():
    images = shrunk_crops(3, (64, 64))
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
    images = shrunk_crops(30, (32, 32))
    small_cells = HogParams(pixels_per_cell=(4, 4))
    got, info = compute_features(images, FeatureParams(hog=small_cells, scaling="standard"))
    raw, _ = compute_features(images, FeatureParams(hog=small_cells, scaling="none"))
    varying = raw.std(axis=0) > 0
    assert np.abs(got.mean(axis=0)).max() < 1e-4
    assert np.allclose(got[:, varying].std(axis=0), 1.0, atol=1e-3)
    assert np.all(got[:, ~varying] == 0)
    assert info["standard"]["constant_columns"] == int((~varying).sum())


def test_n_jobs_does_not_change_a_byte(tmp_path):
    images = shrunk_crops(40, (64, 64), seed=1)
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
    images = shrunk_crops(2, (96, 64))
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
    images = shrunk_crops(2, (64, 64))
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


def _images(n: int, seed: int = 0, hw: tuple[int, int] = (32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : hw[0], 0 : hw[1]]
    out = np.empty((n, *hw, 3), np.uint8)
    for i in range(n):
        slope = rng.uniform(-4, 4, 3)
        base = rng.uniform(0, 255, 3) + slope * (x[..., None] + rng.uniform(-1, 1) * y[..., None])
        out[i] = np.clip(base + rng.normal(0, 20, (*hw, 3)), 0, 255)
    return out


def _log() -> list[dict]:
    path = memo.cache_root() / "decodes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("scaling", ["original", "none", "standard"])
def test_streamed_features_equal_the_in_memory_result(tmp_path, monkeypatch, scaling):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    images = _images(45)
    images[7] = images[3]  # the same pixels twice: computed once, written twice
    chunked.save(tmp_path / "images", images, target=8)
    p = FeatureParams(hog=HogParams(pixels_per_cell=(8, 8)), scaling=scaling)
    info = features.write_features(tmp_path / "images", tmp_path / "f", p, ComputeParams(batch_size=8))
    expected, expected_info = compute_features(images, p, batch_size=8)
    written = chunked.ChunkedArray(tmp_path / "f")
    assert written.chunks == chunked.ChunkedArray(tmp_path / "images").chunks > 1  # chunk for chunk
    assert np.asarray(written).tobytes() == expected.tobytes() and written.shape == expected.shape
    assert info == expected_info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "f", "images"]  # nothing left beside
    assert _log()[-1] == {"stage": "features", "decoded": 44, "cached": 0}


def test_added_images_are_the_only_ones_computed_and_workers_change_no_byte(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    p = FeatureParams()
    old, new = _images(40, seed=1, hw=(64, 64)), _images(3, seed=2, hw=(64, 64))
    chunked.save(tmp_path / "old", old, target=8)
    features.write_features(tmp_path / "old", tmp_path / "f_old", p, ComputeParams(batch_size=16))
    grown = np.concatenate([old[:20], new, old[20:]])  # new rows anywhere: keys are the pixels
    chunked.save(tmp_path / "grown", grown, target=8)
    two_jobs = ComputeParams(n_jobs=2, batch_size=16)
    features.write_features(tmp_path / "grown", tmp_path / "f_grown", p, two_jobs)
    assert _log()[-1] == {"stage": "features", "decoded": 3, "cached": 40}
    expected, _ = compute_features(grown, p)
    assert np.asarray(chunked.ChunkedArray(tmp_path / "f_grown")).tobytes() == expected.tobytes()
    # The chunks the new rows did not join are the old run's files, not written again.
    old_files = {f.name: f.stat().st_ino for f in (tmp_path / "f_old").glob("part-*")}
    new_files = {f.name: f.stat().st_ino for f in (tmp_path / "f_grown").glob("part-*")}
    shared = set(old_files) & set(new_files)
    assert len(shared) >= len(old_files) - 1 and all(old_files[n] == new_files[n] for n in shared)


def test_other_features_params_do_not_reuse_the_memo(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    chunked.save(tmp_path / "images", _images(5))
    for orientations in (9, 6):
        p = FeatureParams(hog=HogParams(orientations=orientations))
        features.write_features(tmp_path / "images", tmp_path / "f", p, ComputeParams())
        assert _log()[-1]["decoded"] == 5


def test_empty_images_give_an_empty_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    chunked.save(tmp_path / "images", np.zeros((0, 64, 64, 3), np.uint8))
    info = features.write_features(tmp_path / "images", tmp_path / "f", FeatureParams(), ComputeParams())
    assert chunked.ChunkedArray(tmp_path / "f").shape == (0, info["dim"])


@pytest.mark.parametrize(
    ("n", "d", "block_bytes"), [(50, 17, 8 * 50 * 2), (7, 40, 8 * 7 * 3), (300, 9, 1 << 26)]
)
def test_column_moments_are_numpys_bit_for_bit(n, d, block_bytes):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, d)) * rng.uniform(0, 50, d) + rng.uniform(-9, 9, d)).astype(np.float32)
    mean, std = column_moments(x, max_block_bytes=block_bytes)
    assert mean.tobytes() == x.mean(axis=0, dtype=np.float64).tobytes()
    assert std.tobytes() == x.std(axis=0, dtype=np.float64).tobytes()
