"""DEC-style image features: HOG of the grayscale image, then a small Cr/Cb colour map.

The feature vector of one image is the concatenation of

* ``skimage.feature.hog(rgb2gray(img), ...)`` with ``feature_vector=True``, and
* the image shrunk to ``color_size`` with ``cv2.INTER_AREA``, converted to YCrCb,
  keeping Cr and Cb (ravelled in ``(h, w, 2)`` order),

scaled as ``params.features.scaling`` says. :func:`hog_batch` computes the HOG of a whole
batch at once in numpy and reproduces scikit-image's result (its binning, its float32
accumulation, its block normalisation) rather than approximating it; :func:`reference_features`
is the plain per-image version that the tests and the benchmark compare against (against
scikit-image 0.26 the largest difference seen is 0; the tests hold it to 1e-5).
"""

from __future__ import annotations

from typing import Any

import cv2
import joblib
import numpy as np

from photoprep.errors import UserError
from photoprep.params import FeatureParams, HogParams

# skimage's block normalisation constant (``_hog_normalize_block(..., eps=1e-5)``).
_EPS = 1e-5
# Coefficients of skimage.color.rgb2gray.
_GRAY_COEFFS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)
# The 'original' scaling of the DEC features.
_HOG_SHIFT, _HOG_GAIN = 0.2, 10.0
_CHROMA_SHIFT, _CHROMA_DIV = 128.0, 10.0
# Images per vectorised HOG step (see _hog_numpy).
_HOG_CHUNK = 16


# --------------------------------------------------------------------------- grayscale


def gray_batch(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``N x H x W x 3`` -> float64 ``N x H x W``, bit-identical to ``skimage.color.rgb2gray``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x H x W x 3 images, got {rgb.dtype} {rgb.shape}")
    # Same two steps as skimage (img_as_float64, then a matmul with the weights), so the
    # rounding is the same too; elementwise r*a + g*b + b*c differs in the last bit.
    as_float = np.multiply(rgb, 1.0 / 255, dtype=np.float64)
    return as_float @ _GRAY_COEFFS


# --------------------------------------------------------------------------- HOG


def hog_shape(image_hw: tuple[int, int], p: HogParams) -> tuple[int, int, int, int, int]:
    """``(n_blocks_row, n_blocks_col, cells_row, cells_col, orientations)`` of the HOG of one image."""
    (c_row, c_col), (b_row, b_col) = p.pixels_per_cell, p.cells_per_block
    n_blocks_row = image_hw[0] // c_row - b_row + 1
    n_blocks_col = image_hw[1] // c_col - b_col + 1
    if n_blocks_row <= 0 or n_blocks_col <= 0:
        raise ValueError(
            f"images of {image_hw[0]} x {image_hw[1]} are too small for pixels_per_cell "
            f"{list(p.pixels_per_cell)} and cells_per_block {list(p.cells_per_block)}: "
            f"need at least {b_row * c_row} x {b_col * c_col}"
        )
    return (n_blocks_row, n_blocks_col, b_row, b_col, p.orientations)


def hog_batch(gray: np.ndarray, p: HogParams) -> np.ndarray:
    """HOG of every image of a float ``N x H x W`` batch, as ``N x D``.

    Row ``i`` equals ``skimage.feature.hog(gray[i], p.orientations, p.pixels_per_cell,
    p.cells_per_block, p.block_norm, feature_vector=True)``; ``p.impl`` picks how it is computed.
    """
    gray = np.asarray(gray)
    if gray.ndim != 3:
        raise ValueError(f"expected a N x H x W batch of grayscale images, got shape {gray.shape}")
    if p.impl == "skimage":
        return _hog_skimage(gray, p)
    if p.impl == "opencv":
        _opencv_unavailable()
    return _hog_numpy(gray, p)


def _hog_skimage(gray: np.ndarray, p: HogParams) -> np.ndarray:
    """skimage.feature.hog one image at a time."""
    shape = hog_shape(gray.shape[1:], p)
    dtype = _float_dtype(gray.dtype)
    out: np.ndarray = np.empty((len(gray), int(np.prod(shape))), dtype=dtype)
    for i, image in enumerate(gray):
        out[i] = _skimage_hog(image, p)
    return out


def _skimage_hog(image: np.ndarray, p: HogParams) -> np.ndarray:
    # Imported here: the default numpy implementation never needs scikit-image (a stage starts faster).
    import skimage.feature

    return skimage.feature.hog(
        image,
        orientations=p.orientations,
        pixels_per_cell=p.pixels_per_cell,
        cells_per_block=p.cells_per_block,
        block_norm=p.block_norm,
        feature_vector=True,
    )


def _opencv_unavailable() -> None:
    """Raise the UserError that explains why ``impl: opencv`` cannot run."""
    if not hasattr(cv2, "HOGDescriptor"):
        raise UserError(
            f"features.hog.impl: opencv needs cv2.HOGDescriptor, which the installed OpenCV "
            f"{cv2.__version__} does not have (OpenCV 5 removed it); use numpy or skimage"
        )
    # cv2.HOGDescriptor interpolates between bins and weights pixels with a Gaussian, so its
    # vectors are not the features the original project clustered.
    raise UserError(
        "features.hog.impl: opencv is not supported: cv2.HOGDescriptor bins differently from "
        "skimage.feature.hog; use numpy or skimage"
    )


def _float_dtype(dtype: np.dtype) -> type:
    """The float type skimage.feature.hog computes in for an input dtype."""
    return np.float32 if dtype in (np.float16, np.float32) else np.float64


def _hog_numpy(gray: np.ndarray, p: HogParams) -> np.ndarray:
    """Vectorised skimage.feature.hog over a batch, a few images at a time."""
    shape = hog_shape(gray.shape[1:], p)
    dtype = _float_dtype(gray.dtype)
    out: np.ndarray = np.empty((len(gray), int(np.prod(shape))), dtype=dtype)
    # Small chunks keep the float64 temporaries in cache: about 2x faster than whole batches.
    for s in range(0, len(gray), _HOG_CHUNK):
        g_row, g_col = _gradients(gray[s : s + _HOG_CHUNK].astype(dtype, copy=False))
        hist = _cell_histograms(g_row, g_col, p)
        out[s : s + _HOG_CHUNK] = _normalised_blocks(hist, p).reshape(len(hist), -1)
    return out


def _gradients(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences with zero borders, as skimage's ``_hog_channel_gradient``, in float64."""
    g_row = np.empty_like(gray)
    g_row[:, 0, :] = 0
    g_row[:, -1, :] = 0
    g_row[:, 1:-1, :] = gray[:, 2:, :] - gray[:, :-2, :]
    g_col = np.empty_like(gray)
    g_col[:, :, 0] = 0
    g_col[:, :, -1] = 0
    g_col[:, :, 1:-1] = gray[:, :, 2:] - gray[:, :, :-2]
    # skimage differentiates in the image's float type, then bins in float64.
    return g_row.astype(np.float64, copy=False), g_col.astype(np.float64, copy=False)


def _by_cell_pixel(a: np.ndarray, cell: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """``N x H x W`` -> ``P x (N * n_cells)``: row k holds pixel k (row-major in its cell) of every cell."""
    (c_row, c_col), (n_row, n_col) = cell, cells
    a = a[:, : n_row * c_row, : n_col * c_col].reshape(len(a), n_row, c_row, n_col, c_col)
    return a.transpose(2, 4, 0, 1, 3).reshape(c_row * c_col, -1)


def orientation_bins(g_row: np.ndarray, g_col: np.ndarray, n: int) -> np.ndarray:
    """skimage's orientation bin of each gradient (``n``: in no bin)."""
    degrees = np.rad2deg(np.arctan2(g_row, g_col))
    # skimage takes ``degrees % 180``; np.remainder is slow, and for degrees in [-180, 180]
    # this gives the same roundings (negative: +180; exactly 180: 0).
    angle = degrees + 180.0 * (degrees < 0)
    angle -= 180.0 * (degrees >= 180)
    return angle_bins(angle, n)


def angle_bins(angle: np.ndarray, n: int) -> np.ndarray:
    """Bin ``i`` with ``(180. / n) * i <= angle < (180. / n) * (i + 1)`` of angles in [0, 180], else ``n``.

    The edges are formed exactly as skimage's Cython code forms them, in double; an angle at or
    above the last one (which rounding can put below 180) falls in no bin.
    """
    per_bin = 180.0 / n
    # A first guess, off by one for some angles on an edge (e.g. n=9, 60 degrees -> 2.999...),
    # corrected against the edges themselves.
    bins = np.floor(angle * (n / 180.0))
    bins -= angle < per_bin * bins
    bins += angle >= per_bin * (bins + 1)
    return bins.astype(np.intp)


def _cell_histograms(g_row: np.ndarray, g_col: np.ndarray, p: HogParams) -> np.ndarray:
    """Per-cell orientation histograms ``N x n_cells_row x n_cells_col x orientations`` (float64).

    skimage's ``_hoghistogram.hog_histograms`` puts each pixel's whole magnitude in one bin (no
    interpolation between bins), sums a cell's pixels row by row into a C ``float`` and divides
    that float32 total by the cell area. The same is done here, for every cell at once.
    """
    n, (c_row, c_col) = p.orientations, p.pixels_per_cell
    cells = (g_row.shape[1] // c_row, g_row.shape[2] // c_col)
    # Only pixels inside whole cells are binned: skip the trigonometry of the others.
    g_row = _by_cell_pixel(g_row, p.pixels_per_cell, cells)
    g_col = _by_cell_pixel(g_col, p.pixels_per_cell, cells)
    # skimage uses np.hypot, 10x slower here; this differs from it in the last bit for about 1
    # pixel in 6, which moves a float32 total below only if it sits on a rounding tie: at most
    # one float32 ulp of a cell, about 1e-8 in the output (none seen in the tests).
    magnitude = np.sqrt(g_col * g_col + g_row * g_row)
    bins = orientation_bins(g_row, g_col, n)

    n_cells = g_row.shape[1]
    # One float32 accumulator per (cell, bin), plus a discard slot for bin n.
    totals = np.zeros(n_cells * (n + 1), dtype=np.float32)
    slots = bins + np.arange(n_cells, dtype=np.intp) * (n + 1)
    for k in range(len(slots)):  # pixel by pixel, in skimage's order: same float32 roundings
        # float32 + float64 -> float64, rounded once to float32 on store: C's ``total += m``.
        totals[slots[k]] = totals[slots[k]] + magnitude[k]
    totals = totals.reshape(n_cells, n + 1)[:, :n]
    # ``total / (cell_rows * cell_columns)`` is a float32 division in C.
    hist = totals / np.float32(c_row * c_col)
    return hist.astype(np.float64).reshape(-1, cells[0], cells[1], n)


def _normalised_blocks(hist: np.ndarray, p: HogParams) -> np.ndarray:
    """Overlapping blocks of cells ``N x nbr x nbc x br x bc x n``, each normalised by ``p.block_norm``."""
    b_row, b_col = p.cells_per_block
    windows = np.lib.stride_tricks.sliding_window_view(hist, (b_row, b_col), axis=(1, 2))
    blocks = np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3))  # window axes before bins
    axes = (-3, -2, -1)
    if p.block_norm in ("L1", "L1-sqrt"):
        out = blocks / (np.abs(blocks).sum(axis=axes, keepdims=True) + _EPS)
        return np.sqrt(out) if p.block_norm == "L1-sqrt" else out
    out = blocks / np.sqrt((blocks**2).sum(axis=axes, keepdims=True) + _EPS**2)
    if p.block_norm == "L2-Hys":
        out = np.minimum(out, 0.2)
        out = out / np.sqrt((out**2).sum(axis=axes, keepdims=True) + _EPS**2)
    return out


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


def check_impl(p: FeatureParams) -> None:
    """Raise the UserError of an implementation that cannot run here."""
    if p.hog.impl == "opencv":
        _opencv_unavailable()


def batch_features(images: np.ndarray, p: FeatureParams) -> np.ndarray:
    """float32 feature rows of one batch, before any whole-set ('standard') scaling."""
    images = np.asarray(images)  # a memmap slice is read here, in the worker
    hog = hog_batch(gray_batch(images), p.hog)
    crcb = color_map_batch(images, p.color_size)
    return _scale(hog, crcb, p.scaling)


def check_images(images: np.ndarray) -> None:
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
    check_impl(p)
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
        hog = _skimage_hog(rgb2gray(arr), p.hog)
        small = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)
        crcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)[:, :, 1:].astype(np.float32)
        rows.append(_scale(hog[None], crcb.reshape(1, -1), p.scaling)[0])
    dim = feature_info(images.shape[1:3], p)["dim"]
    features = np.stack(rows) if rows else np.empty((0, dim), dtype=np.float32)
    if p.scaling == "standard" and len(features):
        standardise(features)
    return features
