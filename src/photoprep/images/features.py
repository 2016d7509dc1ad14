"""DEC-style image features of every processed image: HOG of the grayscale image, then a small
Cr/Cb colour map, computed once per image, stored as chunks beside the images' chunks.

The feature vector of one image is the concatenation of

* ``skimage.feature.hog(rgb2gray(img), ...)`` with ``feature_vector=True`` (`photoprep.images.hog`
  computes it for a whole batch at once), and
* the image shrunk to ``color_size`` with ``cv2.INTER_AREA``, converted to YCrCb,
  keeping Cr and Cb (ravelled in ``(h, w, 2)`` order),

scaled as ``params.features.scaling`` says. :func:`reference_features` is the plain per-image
version that the tests and the benchmark compare against.

Each image (a row of ``data/processed/images``) is keyed by the sha256 of its pixels, and its
feature vector is memoized under a fingerprint of the features params, the image size and the code
of this module and `photoprep.images.hog` (see `photoprep.images.memo`). A change of the bucket
params changes the pixels and so the keys; a change of the features params or code changes the
fingerprint. Adding photos therefore computes the features of the new ones only.

`write_features` writes the features as a chunked array (`photoprep.core.chunked`) whose chunks
are the images' chunks, row for row: each chunk is a part of the features memo, hard-linked into
the output, so an increment computes and writes only the chunks it changes. 'standard' scaling
needs the whole matrix's column moments: they are computed from a memory map of it, in column
blocks, and every chunk is written anew.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import joblib
import numpy as np

from photoprep.core import chunked, parallel
from photoprep.core.errors import UserError, storage_path
from photoprep.core.io import open_array, require_space
from photoprep.core.params import ComputeParams, FeatureParams
from photoprep.images import hog, memo
from photoprep.images.hog import hog_shape, skimage_hog

# The 'original' scaling of the DEC features.
_HOG_SHIFT, _HOG_GAIN = 0.2, 10.0
_CHROMA_SHIFT, _CHROMA_DIV = 128.0, 10.0
# Images per step of `batch_features` (`hog.hog_of_rgb` sums the cells of this many at a time).
STEP = hog.SUM_IMAGES


# --------------------------------------------------------------------------- colour map


def color_map_batch(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``N x H x W x 3`` RGB -> float32 ``N x (h * w * 2)`` Cr/Cb map of ``size = (h, w)``.

    Row ``i`` equals ``cvtColor(resize(rgb[i], (w, h), INTER_AREA), RGB2YCrCb)[:, :, 1:]`` ravelled.
    """
    rgb = np.asarray(rgb)
    h, w = size
    small = np.empty((len(rgb), h, w, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):  # cv2 is fast per image; batching would only save the loop
        small[i] = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_AREA)
    # The colour conversion is per pixel: one call converts the whole batch.
    ycrcb = cv2.cvtColor(small.reshape(-1, w, 3), cv2.COLOR_RGB2YCrCb).reshape(len(rgb), h, w, 3)
    return ycrcb[..., 1:].reshape(len(rgb), -1).astype(np.float32)


# --------------------------------------------------------------------------- feature vectors


def feature_info(image_hw: tuple[int, int], p: FeatureParams) -> dict[str, Any]:
    """JSON-serialisable description of the feature vector of images of ``image_hw``."""
    try:
        shape = hog_shape(image_hw, p.hog)
    except ValueError as exc:
        raise UserError(f"features.hog: {exc}") from None
    hog_length = int(np.prod(shape))
    h, w = p.color_size
    color_length = h * w * 2
    return {
        "image_size": [int(image_hw[0]), int(image_hw[1])],
        "dim": hog_length + color_length,
        "scaling": p.scaling,
        "hog": {
            "offset": 0,
            "length": hog_length,
            # n_blocks_row, n_blocks_col, cells_per_block (row, col), orientations; C order.
            "shape": list(shape),
            "block_length": int(np.prod(shape[2:])),
            "orientations": p.hog.orientations,
            "pixels_per_cell": list(p.hog.pixels_per_cell),
            "cells_per_block": list(p.hog.cells_per_block),
            "block_norm": p.hog.block_norm,
            "impl": p.hog.impl,
        },
        "color": {
            "offset": hog_length,
            "length": color_length,
            "shape": [h, w, 2],  # C order
            "space": "YCrCb",
            "channels": ["Cr", "Cb"],
        },
    }


def _scale(hog: np.ndarray, crcb: np.ndarray, scaling: str) -> np.ndarray:
    """float32 ``N x D`` rows from HOG and Cr/Cb blocks, scaled per row (not 'standard')."""
    if scaling == "original":
        # As the original project: HOG in float64, chroma in float32, then one float32 vector.
        hog = (hog - _HOG_SHIFT) * _HOG_GAIN
        crcb = (crcb - np.float32(_CHROMA_SHIFT)) / np.float32(_CHROMA_DIV)
    return np.concatenate([hog.astype(np.float32), crcb.astype(np.float32)], axis=1)


def column_moments(features: np.ndarray, max_block_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and population std of each column, equal to ``features.mean(axis=0)`` and
    ``features.std(axis=0)`` (``dtype=float64``) bit for bit, in column blocks of at most
    ``max_block_bytes`` of float64 temporaries, so a memory-mapped matrix stays out of the heap.

    Every block has at least two columns: numpy reduces a one-column view in another order
    (pairwise along the rows) than a wider one (row after row), and the last bit would differ.
    """
    n, d = features.shape
    mean = np.empty(d, dtype=np.float64)
    std = np.empty(d, dtype=np.float64)
    width = max(2, min(d, max_block_bytes // max(1, 8 * n)))
    for start in range(0, d, width):
        low = max(0, min(start, d - width))  # the last block as wide as the others
        block = features[:, low : low + width]
        mean[low : low + width] = block.mean(axis=0, dtype=np.float64)
        std[low : low + width] = block.std(axis=0, dtype=np.float64)
    return mean, std


def standardise(features: np.ndarray, rows_per_step: int = 4096) -> int:
    """z-score each column in place (population std; constant columns become 0); count those.

    Works on an ndarray or a writable memory map, a few thousand rows at a time.
    """
    mean, std = column_moments(features)
    constant = std == 0
    std[constant] = 1.0
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    for start in range(0, len(features), rows_per_step):
        features[start : start + rows_per_step] -= mean32
        features[start : start + rows_per_step] /= std32
    return int(constant.sum())


def batch_features(images: np.ndarray, p: FeatureParams) -> np.ndarray:
    """float32 feature rows of one batch, before any whole-set ('standard') scaling."""
    return _features_by_step(lambda start, stop: images[start:stop], len(images), p)


def _features_by_step(read: Callable[[int, int], np.ndarray], count: int, p: FeatureParams) -> np.ndarray:
    """float32 feature rows of `count` images, ``read(start, stop)`` giving images ``start:stop``.

    The images are read and computed `STEP` at a time, into one output: each row depends on its
    image alone, and a step holds about 10 MB at 64 x 64 (the HOG's float64 temporaries are made
    16 images at a time: `hog.hog_of_rgb`), whatever ``compute.batch_size`` is and however many
    batches run at once (threads: `_features_of`).
    """
    out: np.ndarray | None = None
    for start in range(0, max(1, count), STEP):
        part = np.asarray(read(start, start + STEP))  # a memmap's rows are read here, in the worker
        rows = _scale(hog.hog_of_rgb(part, p.hog), color_map_batch(part, p.color_size), p.scaling)
        if out is None:
            out = np.empty((count, rows.shape[1]), dtype=np.float32)
        out[start : start + len(rows)] = rows
    assert out is not None
    return out


def check_images(images: np.ndarray | chunked.ChunkedArray) -> None:
    """Raise a UserError unless ``images`` is uint8 ``N x H x W x 3``."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"features: expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")


def compute_features(
    images: np.ndarray, p: FeatureParams, n_jobs: int = 1, batch_size: int = 256
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of uint8 ``N x H x W x 3`` images (an ndarray or np.memmap) as float32 ``N x D``, plus info.

    Batches of ``batch_size`` images run in ``n_jobs`` joblib workers (-1: every core; 1: in this
    process). The batches do not depend on ``n_jobs``, so neither does a single output byte.
    """
    check_images(images)
    hog.check_impl(p.hog)
    info = feature_info(images.shape[1:3], p)
    starts = range(0, len(images), batch_size)
    if n_jobs == 1 or len(starts) <= 1:
        parts = [batch_features(images[s : s + batch_size], p) for s in starts]
    else:
        work = (joblib.delayed(batch_features)(images[s : s + batch_size], p) for s in starts)
        parts = joblib.Parallel(n_jobs=n_jobs)(work)
    features = np.empty((len(images), info["dim"]), dtype=np.float32)
    for s, part in zip(starts, parts, strict=True):
        features[s : s + len(part)] = part
    if p.scaling == "standard" and len(features):
        info["standard"] = {"ddof": 0, "constant_columns": standardise(features)}
    return features, info


def reference_features(images: np.ndarray, p: FeatureParams) -> np.ndarray:
    """The plain per-image computation (skimage rgb2gray + hog, cv2 resize + cvtColor): float32 ``N x D``."""
    check_images(images)
    from skimage.color import rgb2gray

    h, w = p.color_size
    rows = []
    for image in images:
        arr = np.ascontiguousarray(image)
        hog = skimage_hog(rgb2gray(arr), p.hog)
        small = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)
        crcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)[:, :, 1:].astype(np.float32)
        rows.append(_scale(hog[None], crcb.reshape(1, -1), p.scaling)[0])
    dim = feature_info(images.shape[1:3], p)["dim"]
    features = np.stack(rows) if rows else np.empty((0, dim), dtype=np.float32)
    if p.scaling == "standard" and len(features):
        standardise(features)
    return features


def pixel_keys(images: Any) -> list[str]:
    """The sha256 (hex) of each image's pixel bytes (an array, or a chunked array read chunk by chunk)."""
    if isinstance(images, chunked.ChunkedArray):
        return [key for _, _, block in images.blocks() for key in pixel_keys(block)]
    return [hashlib.sha256(np.ascontiguousarray(image).data).hexdigest() for image in images]


@parallel.in_threads
def _features_of(positions: np.ndarray, images_path: str, p: FeatureParams) -> np.ndarray:
    """Feature rows of the images at `positions` of the chunked array (read in the worker, a
    step at a time)."""
    images, at = chunked.ChunkedArray(images_path), np.asarray(positions)
    return _features_by_step(lambda start, stop: images.take(at[start:stop]), len(at), p)


def _features_of_pixels(pixels: np.ndarray, p: FeatureParams) -> np.ndarray:
    """Feature rows of a batch of pixel rows sent to the worker (a Dask worker sees no local file)."""
    return batch_features(pixels, p)


def feature_memo(images: Any, p: FeatureParams) -> memo.Memo:
    """The memo of feature rows for images of this size under these params and this code."""
    settings = {"features": p.model_dump(mode="json"), "image_size": list(images.shape[1:3])}
    # The code of the features is this module and the HOG it calls.
    return memo.Memo("features", memo.fingerprint(settings, hog, sys.modules[__name__]), arrays=True)


def write_features(images_path: Path, path: Path, p: FeatureParams, compute: ComputeParams) -> dict[str, Any]:
    """Write the float32 ``N x D`` features of the chunked images at `images_path` as the chunked
    array folder `path`, chunk for chunk beside the images; return the info.

    Each chunk is a part of the features memo (keyed by the sha256 of each image's pixels),
    computed only for the images that no part holds, in `compute`'s workers, and hard-linked
    into `path` ('standard' scaling, which changes every row when rows are added, writes its
    chunks instead). The free space for the memo's new chunks is checked before any is computed.
    """
    images = chunked.ChunkedArray(images_path)
    check_images(images)
    hog.check_impl(p.hog)
    info = feature_info((images.shape[1], images.shape[2]), p)
    keys = pixel_keys(images)
    cache = feature_memo(images, p)
    cuts = [(int(images.starts[i]), int(images.starts[i + 1])) for i in range(images.chunks)]
    chunks = [keys[start:stop] for start, stop in cuts]
    row_bytes = 4 * info["dim"]
    standard = p.scaling == "standard" and len(keys) > 0
    new_rows = sum(len(c) for c in chunks if not cache.holds_part(c))
    whole_bytes = len(keys) * row_bytes
    out_bytes = whole_bytes if standard else chunked.copy_bytes(cache.directory, path, whole_bytes)
    require_space([(cache.directory, new_rows * row_bytes), (path, out_bytes)])

    def compute_rows(positions: list[np.ndarray]) -> Any:  # the images' rows: the chunks are slices of `keys`
        total = sum(len(group) for group in positions)
        if compute.backend == "dask":
            # Workers elsewhere cannot open the images' folder: each group's pixels (12 KB an
            # image at 64x64) go with the task, straight to a worker (photoprep.core.parallel).
            return parallel.imap_groups(
                _features_of_pixels,
                parallel.LazyGroups(lambda group: images.take(np.asarray(group)), positions),
                compute,
                p,
                desc="features",
                total=total,
            )
        return parallel.imap_groups(
            _features_of, positions, compute, str(images_path), p, desc="features", local_first=True
        )

    computed = cache.fill_chunks(chunks, compute_rows, compute.batch_size)
    memo.log_decodes("features", decoded=computed, cached=len(set(keys)) - computed)
    if not standard:
        parts = [chunked.Chunk(memo.part_name(c), len(c), cache.part_path(c)) for c in chunks]
        needed = out_bytes or None
        chunked.write_folder(path, parts, np.float32, (info["dim"],), needed=needed, origin=cache.origin)
        return info
    # 'standard': the column moments of the whole matrix, from a memory map of it beside the output.
    tmp = path.with_name(f".{path.name}.unscaled-{os.getpid()}.npy")
    try:
        with storage_path(path, len(keys) * row_bytes, aliases=(str(tmp),)):
            whole = open_array(tmp, np.float32, (len(keys), info["dim"]))
        for chunk, (start, stop) in zip(chunks, cuts, strict=True):
            whole[start:stop] = np.load(cache.part_path(chunk), mmap_mode="r")
        info["standard"] = {"ddof": 0, "constant_columns": standardise(whole)}
        scaled = [
            chunked.Chunk(memo.part_name(c), len(c), chunked.rows_of(whole, start, stop))
            for c, (start, stop) in zip(chunks, cuts, strict=True)
        ]
        chunked.write_folder(path, scaled, np.float32, (info["dim"],), needed=whole_bytes)
        del whole, scaled
    finally:
        tmp.unlink(missing_ok=True)
    return info
