"""HOG of a batch of grey images at once, in numpy, reproducing scikit-image's `hog`.

`hog_batch` computes the HOG of a whole batch at once and reproduces scikit-image's result (its
binning, its float32 accumulation, its block normalisation) rather than approximating it:
against scikit-image 0.26 the largest difference seen is 0; the tests hold it to 1e-5.
`gray_batch` is `skimage.color.rgb2gray`, bit for bit.

Why by hand: `skimage.feature.hog` takes one image at a time, and a Python loop over images
costs more than the HOG itself at 64 x 64; OpenCV's HOGDescriptor bins differently (and OpenCV
5 removed it). ``impl: skimage`` runs scikit-image itself.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from photoprep.core.errors import UserError
from photoprep.core.params import HogParams

# skimage's block normalisation constant (``_hog_normalize_block(..., eps=1e-5)``).
_EPS = 1e-5
# Coefficients of skimage.color.rgb2gray.
_GRAY_COEFFS = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)
# Images per vectorised HOG step: its float64 temporaries stay in the CPU's cache (see _hog_numpy).
_HOG_CHUNK = 16
# Images whose per-pixel float32 sums run as one loop (see _cell_histograms).
SUM_IMAGES = 128


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
    dtype = _float_dtype(gray.dtype)
    return _hog_numpy(lambda a, b: gray[a:b].astype(dtype, copy=False), len(gray), gray.shape[1:], dtype, p)


def hog_of_rgb(rgb: np.ndarray, p: HogParams) -> np.ndarray:
    """``hog_batch(gray_batch(rgb), p)``, the same bytes, with the grey images made a step at a
    time: a batch's float64 grey image is never held whole."""
    rgb = np.asarray(rgb)
    if p.impl != "numpy":
        return hog_batch(gray_batch(rgb), p)
    return _hog_numpy(lambda a, b: gray_batch(rgb[a:b]), len(rgb), rgb.shape[1:3], np.float64, p)


def _hog_skimage(gray: np.ndarray, p: HogParams) -> np.ndarray:
    """skimage.feature.hog one image at a time."""
    shape = hog_shape(gray.shape[1:], p)
    dtype = _float_dtype(gray.dtype)
    out: np.ndarray = np.empty((len(gray), int(np.prod(shape))), dtype=dtype)
    for i, image in enumerate(gray):
        out[i] = skimage_hog(image, p)
    return out


def skimage_hog(image: np.ndarray, p: HogParams) -> np.ndarray:
    """skimage.feature.hog of one grey image: the reference the batch version reproduces."""
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


def check_impl(p: HogParams) -> None:
    """Raise the UserError of an implementation that cannot run here."""
    if p.impl == "opencv":
        _opencv_unavailable()


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


def _hog_numpy(
    gray_of: Callable[[int, int], np.ndarray],
    count: int,
    image_hw: tuple[int, int],
    dtype: type,
    p: HogParams,
) -> np.ndarray:
    """Vectorised skimage.feature.hog of `count` images, ``gray_of(start, stop)`` giving the grey
    images ``start:stop`` in `dtype`: the cells' sums `SUM_IMAGES` images at a time, the other
    steps `_HOG_CHUNK` images at a time (small chunks keep the float64 temporaries in cache:
    about 2x faster than whole batches)."""
    shape = hog_shape(image_hw, p)
    cells = (image_hw[0] // p.pixels_per_cell[0], image_hw[1] // p.pixels_per_cell[1])
    out: np.ndarray = np.empty((count, int(np.prod(shape))), dtype=dtype)
    for s in range(0, count, SUM_IMAGES):
        hist = _cell_histograms(gray_of, range(s, min(count, s + SUM_IMAGES)), cells, p)
        for t in range(0, len(hist), _HOG_CHUNK):
            blocks = _normalised_blocks(hist[t : t + _HOG_CHUNK], p)
            out[s + t : s + t + len(blocks)] = blocks.reshape(len(blocks), -1)
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


def _cell_histograms(
    gray_of: Callable[[int, int], np.ndarray], images: range, cells: tuple[int, int], p: HogParams
) -> np.ndarray:
    """Per-cell orientation histograms ``N x n_cells_row x n_cells_col x orientations`` (float64)
    of the grey `images` that ``gray_of(start, stop)`` gives, ``cells`` (rows, columns) of them.

    skimage's ``_hoghistogram.hog_histograms`` puts each pixel's whole magnitude in one bin (no
    interpolation between bins), sums a cell's pixels row by row into a C ``float`` and divides
    that float32 total by the cell area. The same is done here, for every cell at once: the
    magnitudes and bins `_HOG_CHUNK` images at a time, then one loop over the pixels of a cell
    for all the images. That loop's numpy steps are small (one pixel of every cell) and hold
    the interpreter's lock between them; summing 128 images at a time rather than 16 makes 8x
    fewer of them, which is what lets two threads run it side by side.
    """
    n, (c_row, c_col) = p.orientations, p.pixels_per_cell
    per_image = cells[0] * cells[1]
    # (pixel of a cell, cell of every image)
    magnitude = np.empty((c_row * c_col, len(images) * per_image), dtype=np.float64)
    slots = np.empty(magnitude.shape, dtype=np.intp)
    for t in range(images.start, images.stop, _HOG_CHUNK):
        g_row, g_col = _gradients(gray_of(t, min(images.stop, t + _HOG_CHUNK)))
        # Only pixels inside whole cells are binned: skip the trigonometry of the others.
        g_row = _by_cell_pixel(g_row, p.pixels_per_cell, cells)
        g_col = _by_cell_pixel(g_col, p.pixels_per_cell, cells)
        first = (t - images.start) * per_image
        at = slice(first, first + g_row.shape[1])
        # skimage uses np.hypot, 10x slower here; this differs from it in the last bit for about 1
        # pixel in 6, which moves a float32 total below only if it sits on a rounding tie: at most
        # one float32 ulp of a cell, about 1e-8 in the output (none seen in the tests).
        np.sqrt(g_col * g_col + g_row * g_row, out=magnitude[:, at])
        # One float32 accumulator per (cell, bin), plus a discard slot for bin n.
        cell = np.arange(at.start, at.stop, dtype=np.intp)
        slots[:, at] = orientation_bins(g_row, g_col, n) + cell * (n + 1)
    n_cells = magnitude.shape[1]
    totals = np.zeros(n_cells * (n + 1), dtype=np.float32)
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
