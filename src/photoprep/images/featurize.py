"""Features of every processed image, computed once per image and streamed into features.npy.

Each row of ``images.npy`` is keyed by the sha256 of its pixels, and its feature vector is
memoized under a fingerprint of the features params, the image size and the code of
`photoprep.images.features` (see `photoprep.images.memo`). A change of the bucket params
changes the pixels and so the keys; a change of the features params or code changes the
fingerprint. Adding photos therefore computes the features of the new ones only.

The output is filled batch by batch through a memory map of its temporary file (then renamed
into place), so the stage holds a batch of rows, never the matrix: its bytes equal those of
``io.write_array(compute_features(images, p)[0], path)``. 'standard' scaling needs the whole
matrix's column moments: they are computed from the memory map, in column blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from photoprep import parallel
from photoprep.images import features, memo
from photoprep.io import atomic_path
from photoprep.params import ComputeParams, FeatureParams


def pixel_keys(images: np.ndarray) -> list[str]:
    """The sha256 (hex) of each image's pixel bytes."""
    return [hashlib.sha256(np.ascontiguousarray(image).data).hexdigest() for image in images]


def _features_of(positions: Sequence[int], images_path: str, p: FeatureParams) -> np.ndarray:
    """Feature rows of the images at `positions` of the .npy file (read in the worker)."""
    images = np.load(images_path, mmap_mode="r")
    return features.batch_features(images[list(positions)], p)


def _features_of_pixels(pixels: np.ndarray, p: FeatureParams) -> np.ndarray:
    """Feature rows of a batch of pixel rows sent to the worker (a Dask worker sees no local file)."""
    return features.batch_features(pixels, p)


class PixelRows(Sequence[np.ndarray]):
    """The rows of `images` at `positions`, read from the memory map only when a batch is sliced."""

    def __init__(self, images: np.ndarray, positions: Sequence[int]):
        self.images = images
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return np.ascontiguousarray(self.images[self.positions[index]])
        return self.images[self.positions[index]]


def feature_memo(images: np.ndarray, p: FeatureParams) -> memo.Memo:
    """The memo of feature rows for images of this size under these params and this code."""
    settings = {"features": p.model_dump(mode="json"), "image_size": list(images.shape[1:3])}
    return memo.Memo("features", memo.fingerprint(settings, features), arrays=True)


def write_features(images_path: Path, path: Path, p: FeatureParams, compute: ComputeParams) -> dict[str, Any]:
    """Write the float32 ``N x D`` features of the images in `images_path` to `path`; return the info.

    Only images whose pixels are not in the memo are computed, in `compute`'s batches and
    workers; each batch is memoized as it comes back, so a killed run keeps what it finished.
    """
    images = np.load(images_path, mmap_mode="r")
    features.check_images(images)
    features.check_impl(p)
    info = features.feature_info(images.shape[1:3], p)
    keys = pixel_keys(images)
    cache = feature_memo(images, p)
    todo = cache.missing(keys)
    if todo:
        first: dict[str, int] = {}
        for position, key in enumerate(keys):
            first.setdefault(key, position)
        positions = [first[key] for key in todo]
        batches: Iterator[tuple[Sequence[Any], np.ndarray]]
        if compute.backend == "dask":
            # Workers elsewhere cannot open images.npy: each batch's pixels (12 KB an image at
            # 64x64) go with the task, straight to a worker (photoprep.parallel).
            batches = parallel.imap_batches(
                _features_of_pixels, PixelRows(images, positions), compute, p, desc="features"
            )
        else:
            batches = parallel.imap_batches(
                _features_of, positions, compute, str(images_path), p, desc="features"
            )
        cache.fill(todo, batches, lambda keys, rows: (pd.DataFrame({"sha256": keys}), rows))
    memo.log_decodes("features", decoded=len(todo), cached=len(set(keys)) - len(todo))
    step = memo.write_step(compute.batch_size, 4 * info["dim"])
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), info["dim"]))
        for start in range(0, len(keys), step):
            cache.arrays(keys[start : start + step], out=out[start : start + step])
            out.flush()
        if p.scaling == "standard" and len(keys):
            info["standard"] = {"ddof": 0, "constant_columns": features.standardise(out)}
        out.flush()
        del out
    return info
