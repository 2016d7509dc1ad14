"""features.npy written batch by batch from the memo equals the in-memory computation, byte for byte,
and adding images computes the features of the new ones only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from photoprep.images import featurize, memo
from photoprep.images.features import column_moments, compute_features
from photoprep.io import write_array
from photoprep.params import ComputeParams, FeatureParams, HogParams


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
    np.save(tmp_path / "images.npy", images)
    p = FeatureParams(hog=HogParams(pixels_per_cell=(8, 8)), scaling=scaling)
    info = featurize.write_features(
        tmp_path / "images.npy", tmp_path / "f.npy", p, ComputeParams(batch_size=8)
    )
    expected, expected_info = compute_features(images, p, batch_size=8)
    write_array(expected, tmp_path / "expected.npy")
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()
    assert info == expected_info
    assert _log()[-1] == {"stage": "features", "decoded": 44, "cached": 0}


def test_added_images_are_the_only_ones_computed_and_workers_change_no_byte(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    p = FeatureParams()
    old, new = _images(40, seed=1, hw=(64, 64)), _images(3, seed=2, hw=(64, 64))
    np.save(tmp_path / "old.npy", old)
    featurize.write_features(tmp_path / "old.npy", tmp_path / "f_old.npy", p, ComputeParams(batch_size=16))
    grown = np.concatenate([old[:20], new, old[20:]])  # new rows anywhere: keys are the pixels
    np.save(tmp_path / "grown.npy", grown)
    two_jobs = ComputeParams(n_jobs=2, batch_size=16)
    featurize.write_features(tmp_path / "grown.npy", tmp_path / "f_grown.npy", p, two_jobs)
    assert _log()[-1] == {"stage": "features", "decoded": 3, "cached": 40}
    expected, _ = compute_features(grown, p)
    write_array(expected, tmp_path / "expected.npy")
    assert (tmp_path / "f_grown.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()


def test_other_features_params_do_not_reuse_the_memo(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    np.save(tmp_path / "images.npy", _images(5))
    for orientations in (9, 6):
        p = FeatureParams(hog=HogParams(orientations=orientations))
        featurize.write_features(tmp_path / "images.npy", tmp_path / "f.npy", p, ComputeParams())
        assert _log()[-1]["decoded"] == 5


def test_empty_images_give_an_empty_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv(memo.CACHE_ENV, str(tmp_path / "cache"))
    np.save(tmp_path / "images.npy", np.zeros((0, 64, 64, 3), np.uint8))
    info = featurize.write_features(
        tmp_path / "images.npy", tmp_path / "f.npy", FeatureParams(), ComputeParams()
    )
    assert np.load(tmp_path / "f.npy").shape == (0, info["dim"])


@pytest.mark.parametrize(
    ("n", "d", "block_bytes"), [(50, 17, 8 * 50 * 2), (7, 40, 8 * 7 * 3), (300, 9, 1 << 26)]
)
def test_column_moments_are_numpys_bit_for_bit(n, d, block_bytes):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, d)) * rng.uniform(0, 50, d) + rng.uniform(-9, 9, d)).astype(np.float32)
    mean, std = column_moments(x, max_block_bytes=block_bytes)
    assert mean.tobytes() == x.mean(axis=0, dtype=np.float64).tobytes()
    assert std.tobytes() == x.std(axis=0, dtype=np.float64).tobytes()
