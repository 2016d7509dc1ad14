"""Fingerprints of a decoded picture: perceptual hashes (with trims, crops and transforms), and
the facts the keep rule reads from a file (JPEG quality, camera EXIF, colour).

The hash is imagehash's (`phash`, `dhash`, `ahash`, `whash`) on the upright grey picture; the
probe (`photoprep.images.probe`) decodes it at a scale whose shorter side stays >= `hash_side`.
`whash` gets a fixed `image_scale` (8 * hash_size) instead of imagehash's default, which
follows the input size and so would follow the decode scale. Every hash may leave out a margin
of each side (`trimmed`), and a crop's hash is what a copy cropped by that share of each side
would hash to (`crop_trim`). `FINE_HASH` (256 bits) verifies candidate pairs and crop matches.
The probe hashes all of a picture's views in one call (`view_hashes`): each string is the one
imagehash gives; for phash the DCTs and medians run once over the stack of views, so what is
left of the cost is Pillow's LANCZOS resize of each view (bench/probe.py).

The JPEG quality is estimated from the luminance quantisation table (`jpeg_quality`); EXIF
names a camera when it has Make, Model or DateTimeOriginal (`names_a_camera`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import imagehash
import numpy as np
import scipy.fftpack
from PIL import Image

from photoprep.images.formats import JPEG_FORMATS

HASHES = ("phash", "dhash", "whash", "ahash")
TRANSFORMS = ("hflip", "rot90", "rot180", "rot270")
"""Transformed versions whose hashes the probe adds (`transform_hashes`, comma-separated):
the picture mirrored left-right, or turned 90, 180, 270 degrees anticlockwise."""


MAX_TRIM = 0.35
"""The most of each side `margin` and a crop (together) may take off before hashing."""


FINE_HASH = ("phash", 16)
"""The finer similarity of the probe's `fine_hash` (256 bits): the dedup stage's medoid and
its verification of candidate pairs."""


COLOUR_CHROMA = 2.0
"""Mean chroma (distance of Cb, Cr from grey, 0..~180) at or above which a picture has colour."""


_TRANSFORM = {
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
}


STD_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float64,
).ravel()
"""libjpeg's standard luminance quantisation table (quality 50), in natural (row-major) order."""
_STD_LUMA_SUM = float(STD_LUMA_TABLE.sum())  # 3688


def crop_trim(crop: float, margin: float) -> float:
    """The share of each side to take off a picture so that it shows what a copy cropped by
    `crop` of every side shows once its own `margin` is taken off."""
    return crop + margin * (1 - 2 * crop)


def trimmed(im: Image.Image, trim: float) -> Image.Image:
    """`im` without `trim` of its width off the left and right and of its height off the top
    and bottom (symmetric, so trimming and turning commute)."""
    if trim <= 0:
        return im
    w, h = im.size
    dx, dy = round(w * trim), round(h * trim)
    return im.crop((dx, dy, w - dx, h - dy))


def transformed(im: Image.Image, transform: str) -> Image.Image:
    """`im` mirrored left-right (hflip) or turned anticlockwise (rot90, rot180, rot270)."""
    return im.transpose(_TRANSFORM[transform])


def check_transforms(transforms: Sequence[str]) -> None:
    """ValueError unless every transform is one of `TRANSFORMS`."""
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"transforms must be among {TRANSFORMS} (got {unknown})")


def check_trims(trims: Sequence[float]) -> None:
    """ValueError unless every trim (margin, crop) takes between 0 and `MAX_TRIM` of a side."""
    if any(not 0 <= t <= MAX_TRIM for t in trims):
        raise ValueError(
            f"margin and crops must trim between 0 and {MAX_TRIM} of each side (got {list(trims)})"
        )


def mean_chroma(ycbcr: Image.Image) -> float:
    """Mean distance of (Cb, Cr) from grey: at or above `COLOUR_CHROMA` a picture has colour.

    The mean in float32 of ``np.hypot(cb - 128, cr - 128)`` (float32) over the pixels; each
    pixel's distance is looked up in `_chroma_table` (the same float32 values), which costs
    less than converting the channels to float and taking the hypot of each."""
    if ycbcr.mode != "YCbCr":
        raise ValueError(f"mean_chroma needs a YCbCr image (got {ycbcr.mode})")
    if ycbcr.width == 0 or ycbcr.height == 0:
        return 0.0
    pixels = np.asarray(ycbcr)
    # Each pixel's Cb and Cr bytes, side by side, read as one little-endian uint16: cb + 256 * cr.
    pairs = np.ndarray(pixels.shape[:2], "<u2", pixels, offset=1, strides=(pixels.strides[0], 3))
    return float(np.take(_chroma_table(), pairs).mean())


@functools.cache
def _chroma_table() -> np.ndarray:
    """hypot(cb - 128, cr - 128) in float32 for every (cb, cr), at cb + 256 * cr."""
    offset = np.arange(256, dtype=np.float32) - 128
    cb, cr = np.meshgrid(offset, offset, indexing="xy")
    table = np.hypot(cb, cr).ravel()
    table.flags.writeable = False
    return table


def jpeg_quality(im: Image.Image) -> int:
    """libjpeg's quality setting (1..100) that gives the luminance quantisation table, by the
    ratio of its sum to the standard table's sum (0 when there is no table)."""
    tables = getattr(im, "quantization", None) or {}
    if im.format not in JPEG_FORMATS or 0 not in tables:
        return 0
    if max(tables[0]) <= 1:
        return 100
    return quality_of_scale(100.0 * float(np.sum(tables[0])) / _STD_LUMA_SUM)


def quality_of_scale(scale: float) -> int:
    """libjpeg's quality setting (1..100) for a table `scale` % of the standard one."""
    quality = (200.0 - scale) / 2 if scale <= 100 else 5000.0 / max(scale, 1e-9)
    return int(min(100, max(1, round(quality))))


def libjpeg_luma_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg writes at `quality` (baseline: steps 1..255), natural order."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((STD_LUMA_TABLE * scale + 50) / 100), 1, 255)


def names_a_camera(im: Image.Image) -> bool:
    """EXIF names a camera (Make, Model) or a capture time (DateTimeOriginal)."""
    try:
        exif = im.getexif()
        return bool(exif.get(0x010F) or exif.get(0x0110) or exif.get_ifd(0x8769).get(0x9003))
    except Exception:
        return False


def check_hash(name: str, hash_size: int) -> None:
    """ValueError when there is no hash `name` (one of `HASHES`) at `hash_size`."""
    if name not in HASHES:
        raise ValueError(f"hash_name must be one of {HASHES} (got {name!r})")
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2 (got {hash_size})")
    if name == "whash" and hash_size & (hash_size - 1):
        raise ValueError(f"whash needs a power-of-two hash_size (got {hash_size})")


@functools.cache
def hasher_of(name: str, hash_size: int) -> Callable[[Image.Image], imagehash.ImageHash]:
    """The hash function `name` (one of `HASHES`) at `hash_size`; ValueError when there is none."""
    check_hash(name, hash_size)
    if name == "phash":
        return lambda im: imagehash.phash(im, hash_size=hash_size)
    if name == "dhash":
        return lambda im: imagehash.dhash(im, hash_size=hash_size)
    if name == "ahash":
        return lambda im: imagehash.average_hash(im, hash_size=hash_size)
    # imagehash's default scale is the largest power of two under the image's shorter side,
    # i.e. it would depend on the decode scale; a fixed scale keeps the hash about the picture.
    scale = _whash_scale(hash_size)
    return lambda im: imagehash.whash(im, hash_size=hash_size, image_scale=scale)


def view_hashes(views: Sequence[Image.Image], name: str, hash_size: int) -> list[str]:
    """The hash `name` at `hash_size` of each view as hex, exactly the string that
    ``str(hasher_of(name, hash_size)(view))`` (imagehash) gives.

    phash, the probe's default and its `FINE_HASH`, keeps imagehash's steps (Pillow's LANCZOS
    resize to 4 * hash_size a side, scipy.fftpack's DCT of rows then columns, the median of
    the lowest hash_size x hash_size coefficients) but runs the DCTs and medians once over the
    stack of views; the other hashes are imagehash's, one view at a time. Hex strings come from
    the packed bits (`hex_of_bits`), not from imagehash's string of digits."""
    if not views:
        return []
    if name == "phash":
        bits = _phash_bits(views, hash_size)
    else:
        hasher = hasher_of(name, hash_size)
        bits = np.stack([np.asarray(hasher(view).hash).ravel() for view in views])
    return hex_of_bits(bits)


def _phash_bits(views: Sequence[Image.Image], hash_size: int) -> np.ndarray:
    """imagehash.phash's bits (highfreq_factor 4) of each view, one row each."""
    check_hash("phash", hash_size)
    side = 4 * hash_size
    lanczos = Image.Resampling.LANCZOS
    pixels = np.stack([np.asarray(_grey(view).resize((side, side), lanczos)) for view in views])
    # The row DCT only of the rows the hash keeps: each row's transform is its own.
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=1)[:, :hash_size], axis=2)
    low = dct[:, :, :hash_size].reshape(len(views), -1)
    return low > _medians(low)


def _medians(rows: np.ndarray) -> np.ndarray:
    """np.median of each row, as a column: the middle value, or the mean (a + b) / 2 of the two
    middle ones (np.median's own arithmetic), from one sort of the whole stack."""
    ordered = np.sort(rows, axis=1)
    half = rows.shape[1] // 2
    if rows.shape[1] % 2:
        return ordered[:, half : half + 1]
    return (ordered[:, half - 1 : half] + ordered[:, half : half + 1]) / 2


def _grey(view: Image.Image) -> Image.Image:
    # imagehash converts every input to L (a copy when it is L already: the same pixels).
    return view if view.mode == "L" else view.convert("L")


def hex_of_bits(bits: np.ndarray) -> list[str]:
    """Each row of booleans as imagehash writes a hash: the bits, first one most significant,
    as ceil(bits / 4) hex digits."""
    n_bits = bits.shape[1]
    digits, pad = -(-n_bits // 4), -n_bits % 8
    packed = np.packbits(bits.astype(bool, copy=False), axis=1)
    if pad == 0:
        return [row.tobytes().hex() for row in packed]
    return [format(int.from_bytes(row.tobytes(), "big") >> pad, f"0{digits}x") for row in packed]


def _whash_scale(hash_size: int) -> int:
    return 8 * hash_size


def hash_side(hash_size: int) -> int:
    """Shorter side the hash input keeps at least: 6x the 4*hash_size pixels phash resizes to
    (192 for hash_size 8). Measured on 200 photo-like JPEGs (bench/ingest.py): at 4x (128)
    the draft hash was up to 4 bits from imagehash on the full decode and near copies drifted
    twice as far; at 6x it is within 2 bits and near copies stay as close as with a full
    decode. Also >= the fixed whash scale (8*hash_size)."""
    return max(128, 24 * hash_size)
