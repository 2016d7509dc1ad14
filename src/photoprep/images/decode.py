"""Decode image bytes once: a single-pass probe, a safe RGB open, and resized RGB pixels.

`probe` is the one decode the dedup and validate stages need. In a single pass it reads the
header (format, size, mode), rejects bombs before any pixel is allocated, decodes the whole
image to prove the data is complete, and computes the perceptual hash from the same decode.
JPEGs are decoded by libjpeg at reduced scale (`Image.draft`): the scaled IDCT is cheaper,
but the whole entropy-coded stream is still read, so truncation and broken streams are
still caught. `resized_rgb` is the decode the bucket stage needs, again at the smallest JPEG
scale that is not below the target size.

A bad image is never an exception to the caller of `probe`: it is a record with
``valid=False`` and one of `REASONS`. `open_rgb` and `resized_rgb` raise `ImageRejected`
with the same reasons.

Normalisation to RGB (`open_rgb`, `resized_rgb`, and the image the hash is computed on):

- EXIF orientation is applied (width and height are reported after rotation).
- The first frame of animated or multi-page files (GIF, APNG, WebP, TIFF, MPO) is used;
  later frames are not decoded, so damage there is not detected.
- Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on
  white: transparent web graphics are drawn to be seen on a white page, and dropping the
  alpha would expose whatever colour the encoder left under it (often black, which hides
  black line art). Letterbox padding in `resized_rgb(fit="pad")` is black, a different
  thing: it is not part of the picture.
- CMYK and YCbCr go through Pillow's conversion (no ICC colour management).
- 16-bit grey (``I;16*``, and ``I`` taken as 16-bit data) is scaled to 8 bits with
  rounding, ``round(v * 255 / 65535)``; Pillow itself reads 16-bit RGB PNGs as 8-bit RGB.
- Float images (mode ``F``) and any mode Pillow cannot convert to RGB are ``unsupported``.

The hash is imagehash's (`phash`, `dhash`, `ahash`, `whash`) on the upright grey image:
for a JPEG, libjpeg's grey at the draft scale whose shorter side stays >= `hash_side`;
for other formats the same scale factor applied with `Image.reduce`, so one picture hashes
alike as PNG or JPEG. `whash` gets a fixed `image_scale` (8 * hash_size) instead of
imagehash's default, which follows the input size and so would follow the decode scale.

Known limit: random bytes inside a JPEG's entropy-coded data are repaired by libjpeg with
a warning only, and Pillow does not surface libjpeg warnings, so such an image is valid
here (smeared blocks); bytes that form markers (0xFF runs, a stray frame header) are fatal
to libjpeg and give ``corrupt``.

Formats are identified by Pillow's own openers (`OPENED_FORMATS`, tried in order, the
weak-signature TGA last); the magic-byte sniff only names the reason when none of them
identifies the bytes: markup, JSON, text and unknown binary are ``not_an_image``, a known
image format that no opener here reads (EPS, which would run Ghostscript; HEIC without
pillow-heif; JPEG XL, OpenEXR) is ``unsupported``. HEIF opens where pillow-heif is installed
(`register_plugins`).

Limits hold on what a decode would allocate, decided from headers before any pixel is
decoded: every embedded image, frame and page (`photoprep.images.containers`) must be within
`max_pixels`, and with `max_decode_mb` the estimated peak of the decode (`decode_cost_mb`:
the decoded frame at its draft scale plus the normalisation's working copies) must fit the
budget, else ``over_budget``.

The probe also reads what the dedup stage needs to keep the best copy: whether the picture
has colour (chroma at the hash scale), whether the format is lossless, the JPEG quality
estimated from the quantisation tables, whether EXIF names a camera, a finer hash
(`FINE_HASH`) and, when asked, the hashes of transformed versions (mirror, rotations).

Why one module
    Every decode photoprep does goes through the same guards (header checks, bomb limits,
    orientation, the reduced-scale draft); splitting them would let one path skip a guard.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError, features

from photoprep.images import containers
from photoprep.ingest.sniff import is_image_mime, sniff_mime

PROBE_FIELDS = (
    "format",
    "width",
    "height",
    "mode",
    "valid",
    "reason",
    "hash",
    "colour",
    "lossless",
    "quality",
    "camera",
    "fine_hash",
    "transform_hashes",
    "crop_hashes",
    "crop_fine_hashes",
)
REASONS = (
    "zero_bytes",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_many_pixels",
    "over_budget",
    "unsupported",
)
TRANSFORMS = ("hflip", "rot90", "rot180", "rot270")
"""Transformed versions whose hashes `probe` adds (`transform_hashes`, comma-separated):
the picture mirrored left-right, or turned 90, 180, 270 degrees anticlockwise."""
MAX_TRIM = 0.35
"""The most of each side `margin` and a crop (together) may take off before hashing."""
FINE_HASH = ("phash", 16)
"""The finer similarity of the probe's `fine_hash` (256 bits): the dedup stage's medoid and
its verification of candidate pairs."""
COLOUR_CHROMA = 2.0
"""Mean chroma (distance of Cb, Cr from grey, 0..~180) at or above which a picture has colour."""
HASHES = ("phash", "dhash", "whash", "ahash")
FITS = ("stretch", "pad", "crop")

OPENED_FORMATS = (
    "JPEG",
    "PNG",
    "GIF",
    "WEBP",
    "BMP",
    "TIFF",
    "AVIF",
    "HEIF",
    "ICO",
    "CUR",
    "ICNS",
    "JPEG2000",
    "PPM",
    "QOI",
    "PSD",
    "SGI",
    "DDS",
    "PCX",
    "TGA",
)
"""Pillow formats `probe` tries, in this order; HEIF counts only where pillow-heif is
installed. MPO (multi-picture JPEG) comes in through the JPEG opener; PPM reads every Netpbm
file (PBM, PGM, PPM, PAM, PFM). TGA has no magic number, so it is tried last."""
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "PPM", "QOI", "PSD", "SGI", "PCX", "TGA", "ICO", "CUR", "ICNS"})
"""Formats whose pixels are stored exactly (TIFF unless JPEG-compressed, and lossless WebP,
are judged per file)."""

RESAMPLE = Image.Resampling.LANCZOS
"""Resampling of `resized_rgb`. With `REDUCING_GAP` Pillow first box-reduces by an integer
factor and runs Lanczos on the rest, which its docs call indistinguishable from fair
resampling; after a JPEG draft the remaining factor is below 2, so Lanczos costs little."""
REDUCING_GAP = 3.0

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Orientation is read after decoding for these: a PNG's eXIf chunk may follow the pixels, and
# Pillow turns TIFFs upright itself (reporting the upright size from the header on), then
# drops the tag, so reading it after the decode gives 1 and no second rotation.
_LATE_EXIF = frozenset({"PNG", "TIFF"})
_MIME_FORMAT = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
    "image/x-icon": "ICO",
    "image/avif": "AVIF",
    "image/heic": "HEIF",
    "image/x-portable-anymap": "PPM",
    "image/jp2": "JPEG2000",
    "image/x-icns": "ICNS",
    "image/vnd.adobe.photoshop": "PSD",
    "image/qoi": "QOI",
    "image/vnd-ms.dds": "DDS",
    "image/x-sgi": "SGI",
}
_UNSUPPORTED_WORDS = ("unsupported", "not supported", "not available", "not installed", "unknown pixel mode")
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255)
_TRANSFORM = {
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
}
_STRIP_PIXELS = 1 << 20
# Sum of libjpeg's standard luminance quantisation table (quality 50).
_STD_LUMA_SUM = 3688  # 16 + 11 + 10 + ... + 99


def register_plugins() -> None:
    """Register the HEIF opener of pillow-heif where it is installed (phone photos are HEIC);
    Pillow reads AVIF itself. Called on import, so worker processes have it too."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


register_plugins()


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# Public API


def probe(
    data: bytes,
    hash_name: str = "phash",
    hash_size: int = 8,
    max_pixels: int = 50_000_000,
    max_decode_mb: float | None = None,
    transforms: Sequence[str] = (),
    margin: float = 0.0,
    crops: Sequence[float] = (),
) -> dict:
    """Everything the dedup and validate stages need from one decode of `data`.

    Returns a dict with the keys of `PROBE_FIELDS`: format ("" when not identified), width
    and height after EXIF orientation (0 when not identified; a rejected image keeps its
    header size), mode as stored (e.g. "CMYK", "I;16", "P"), valid, reason ("" or one of
    `REASONS`), hash (hex of `hash_name` with `hash_size`, "" when invalid), colour (the
    picture has chroma), lossless (the format stores pixels exactly), quality (JPEG quality
    estimated from the quantisation tables, 0 when unknown or not a JPEG), camera (EXIF names
    a camera or a capture time), fine_hash (`FINE_HASH`), transform_hashes (the hash of
    each of `transforms`, comma-separated, "" when none asked) and crop_hashes (the hash of the
    picture as a copy cropped by each of `crops` of every side would hash, comma-separated;
    crop_fine_hashes likewise with `FINE_HASH`).
    Every hash is of the picture without `margin` of each side (`trimmed`): a caption band,
    a frame or a watermark strip there changes nothing.
    The result depends only on the bytes, the arguments and the codec versions
    (`codec_versions`).
    """
    hasher = _hasher(hash_name, hash_size)
    fine_hasher = _hasher(*FINE_HASH)
    _check_max_pixels(max_pixels)
    _check_transforms(transforms)
    trims = [margin, *(crop_trim(c, margin) for c in crops)]
    _check_trims(trims)
    record: dict = dict.fromkeys(PROBE_FIELDS, "")
    record.update(width=0, height=0, valid=False, colour=False, lossless=False, quality=0, camera=False)
    with _pillow_quiet():
        try:
            im = _open(data, max_pixels, max_decode_mb, gray=True)
            record.update(format=im.format or "", mode=im.mode)
            header_size = im.size
            jpeg = im.format in _JPEG_FORMATS
            orientation = _orientation(im) if im.format not in _LATE_EXIF else 1
            record["width"], record["height"] = _oriented(header_size, orientation)
            _check_pixels(im, data, max_pixels)
            record.update(lossless=_lossless(im, data), quality=_jpeg_quality(im))
            # The same decode scale whatever the margin and crops (the default's deepest trim,
            # 15 % a side, still leaves 134 of 192 pixels): a hash never depends on the crops asked.
            side = hash_side(hash_size)
            if jpeg:
                # Y (the grey the hash is computed on) and chroma straight from libjpeg, at the
                # smallest 1/1..1/8 scale whose shorter side is still >= `side`; the whole
                # stream is still decoded.
                im.draft(_jpeg_draft_mode(im), (side, side))
            _check_budget(im, data, header_size, max_decode_mb, gray=True)
            gray, chroma = _decode_gray(im, data, jpeg, side)
            if im.format in _LATE_EXIF:
                orientation = _orientation(im)
                record["width"], record["height"] = _oriented(header_size, orientation)
            record["camera"] = _camera(im)  # after the decode: a PNG's EXIF may follow its pixels
            gray = _transpose(gray, orientation)
            if not jpeg:
                # Same scale rule as the JPEG draft, so a PNG and a JPEG of one picture hash
                # alike; after the rotation, so a rotation tag and rotated pixels hash alike.
                factor = _draft_factor(gray.size, (side, side))
                if factor > 1:
                    gray = gray.reduce(factor)
        except ImageRejected as rejected:
            record["reason"] = rejected.reason
            if not record["format"]:  # refused before opening: the format its signature names
                record["format"] = containers.format_of(data)
            return record
        picture = trimmed(gray, margin)
        record["hash"] = str(hasher(picture))
        record["fine_hash"] = str(fine_hasher(picture))
        record["transform_hashes"] = ",".join(str(hasher(transformed(picture, t))) for t in transforms)
        crops_seen = [trimmed(gray, trim) for trim in trims[1:]]
        record["crop_hashes"] = ",".join(str(hasher(c)) for c in crops_seen)
        record["crop_fine_hashes"] = ",".join(str(fine_hasher(c)) for c in crops_seen)
        record["colour"] = chroma >= COLOUR_CHROMA
    record["valid"] = True
    return record


def probe_many(
    blobs: Sequence[bytes],
    hash_name: str = "phash",
    hash_size: int = 8,
    max_pixels: int = 50_000_000,
    max_decode_mb: float | None = None,
    transforms: Sequence[str] = (),
    margin: float = 0.0,
    crops: Sequence[float] = (),
) -> list[dict]:
    """`probe` over a batch (one joblib task)."""
    return [
        probe(blob, hash_name, hash_size, max_pixels, max_decode_mb, transforms, margin, crops)
        for blob in blobs
    ]


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


def open_rgb(
    data: bytes,
    max_pixels: int = 50_000_000,
    draft_size: tuple[int, int] | None = None,
    max_decode_mb: float | None = None,
) -> Image.Image:
    """Decode `data` to an upright RGB image (see the module notes), or raise ImageRejected.

    The pixel count is checked from the headers before anything is decoded. With
    `draft_size` = (width, height), upright, a JPEG may be decoded at reduced scale (1/2,
    1/4, 1/8) but never below that size on either side; other formats decode in full.
    """
    return _upright_rgb(data, max_pixels, lambda upright: draft_size, max_decode_mb)


def resized_rgb(
    data: bytes,
    size: tuple[int, int],
    fit: str = "stretch",
    max_pixels: int = 50_000_000,
    max_decode_mb: float | None = None,
) -> np.ndarray:
    """uint8 array of shape (H, W, 3) for size=(H, W), or raise ImageRejected.

    fit: "stretch" resizes to (H, W) ignoring aspect; "pad" keeps aspect, fits inside and
    centres the picture on black; "crop" keeps aspect, fills and cuts the centre.
    Resampling: `RESAMPLE` with `REDUCING_GAP`. A JPEG is decoded at the smallest scale that
    keeps the picture at least as large as the pixels it will fill.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS} (got {fit!r})")
    out = (int(size[1]), int(size[0]))
    if min(out) < 1:
        raise ValueError(f"size must be positive (got {size!r})")
    rgb = _upright_rgb(data, max_pixels, lambda upright: _fill_size(upright, out, fit), max_decode_mb)
    return np.array(_fit(rgb, out, fit), dtype=np.uint8)


def decode_cost_mb(mode: str, size: tuple[int, int], gray: bool, alpha: bool = False) -> float:
    """Estimated peak MB of decoding a frame of `mode` and `size` and normalising it to grey
    (`gray`) or RGB: Pillow's buffer for the frame (1 byte a pixel for 1, L, P; 2 for 16-bit
    grey; 4 for every other mode, RGB included) plus the working copies of the normalisation
    (alpha compositing on white: RGBA, the white canvas, the RGB copy and the mask; 16-bit
    grey: the 8-bit result and the strips it is converted in)."""
    pixels = size[0] * size[1]
    core = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if alpha:
        extra = (0 if mode == "RGBA" else 4) + 4 + 4 + 1
    elif gray and mode == "YCbCr":
        extra = 0  # a JPEG drafted in YCbCr: the grey is its Y channel
    elif mode in ("RGB", "L") or (mode == "1" and not gray):
        extra = 0
    elif mode.startswith("I;16") or mode == "I" or mode == "1":
        extra = 1  # the 8-bit grey, converted in strips
    else:
        extra = 4  # a converted RGB copy (P, CMYK, YCbCr, LA without alpha, ...)
    if gray and mode not in ("L", "1") and not mode.startswith("I"):
        extra += 1
    strips = 3 * 8 * _STRIP_PIXELS if mode.startswith("I") else 0  # int64 working strips
    return (pixels * (core + extra) + strips) / 1e6


def codec_versions() -> dict[str, str]:
    """Versions that decoded pixels and hashes depend on (scaled IDCT, resampling): part of
    any memo key of probe results."""
    return {
        "pillow": Image.__version__,
        "libjpeg": str(features.version("jpg")),
        "imagehash": getattr(imagehash, "__version__", "?"),
        "heif": _heif_version(),
    }


def _heif_version() -> str:
    try:
        from importlib.metadata import version

        return version("pillow-heif")
    except Exception:
        return ""


# ---------------------------------------------------------------------------------------
# Opening and decoding


@contextmanager
def _pillow_quiet() -> Iterator[None]:
    """Silence Pillow's per-image warnings (bomb size, odd EXIF, palette transparency): the
    outcome is in the record. Scoped, so no global setting is left changed."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: photoprep.decode needs it False "
            "to detect truncated images; whoever set it should set it back"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _upright_rgb(
    data: bytes,
    max_pixels: int,
    draft_for: Callable[[tuple[int, int]], tuple[int, int] | None],
    max_decode_mb: float | None = None,
) -> Image.Image:
    """Open, check, decode and normalise to upright RGB. `draft_for(upright size)` gives the
    smallest upright (width, height) a JPEG may be decoded at, or None for full scale."""
    _check_max_pixels(max_pixels)
    with _pillow_quiet():
        im = _open(data, max_pixels, max_decode_mb, gray=False)
        _check_pixels(im, data, max_pixels)
        header_size = im.size
        orientation = _orientation(im) if im.format not in _LATE_EXIF else 1
        if im.format in _JPEG_FORMATS:
            need = draft_for(_oriented(im.size, orientation))
            if need is not None:
                width, height = _oriented(need, orientation)  # back to stored orientation
                im.draft("RGB", (max(1, width), max(1, height)))
        _check_budget(im, data, header_size, max_decode_mb, gray=False)
        rgb = _decode(im, data, gray=False)
        if im.format in _LATE_EXIF:
            orientation = _orientation(im)
        return _transpose(rgb, orientation)


def _opened_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in OPENED_FORMATS if fmt in Image.OPEN)


def _open(data: bytes, max_pixels: int, max_decode_mb: float | None, gray: bool) -> ImageFile.ImageFile:
    """Identify `data` by Pillow's openers and read its header; no pixel is decoded.

    Pillow's ICO and ICNS openers decode their largest image while opening, so the sizes
    that a container's headers announce are checked first (`_check_embedded`)."""
    if not data:
        raise ImageRejected("zero_bytes")
    _check_embedded(data, max_pixels, max_decode_mb, gray)
    formats = _opened_formats()
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS) said no; ours decides.
        return _open_unchecked(data, formats)
    except UnidentifiedImageError:
        raise ImageRejected(_unidentified_reason(data, formats), sniff_mime(data)) from None
    except Exception as exc:  # a plugin failing in an unplanned way on bad bytes
        raise ImageRejected(_failure_reason(exc, data), str(exc)) from None


def _open_unchecked(data: bytes, formats: tuple[str, ...]) -> ImageFile.ImageFile:
    """Image.open without Pillow's bomb check, which runs before we can apply max_pixels."""
    prefix = data[:16]
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        found = accept(prefix) if accept else True
        if found and not isinstance(found, str):
            try:
                return factory(io.BytesIO(data), "")
            except Exception:
                continue
    raise ImageRejected("too_many_pixels", "over Pillow's own limit")


def _check_embedded(data: bytes, max_pixels: int, max_decode_mb: float | None, gray: bool) -> None:
    """Before opening: every size a container's headers announce within `max_pixels`, and
    for the containers Pillow decodes while opening, its largest image (taken as RGBA) within
    the budget."""
    sizes = containers.embedded_sizes(data)
    if not sizes:
        return
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"an embedded {width}x{height} > {max_pixels}")
    if max_decode_mb is not None and containers.decodes_on_open(data):
        cost = decode_cost_mb("RGBA", (width, height), gray, alpha=True)
        if cost > max_decode_mb:
            raise ImageRejected("over_budget", f"about {cost:.0f} MB > max_decode_mb {max_decode_mb}")


def _check_pixels(im: Image.Image, data: bytes, max_pixels: int) -> None:
    """Every image, frame and page the headers announce must be within `max_pixels`."""
    sizes = [im.size, *containers.embedded_sizes(data)]
    with suppress(Exception):  # a damaged later page: the first page's decode still decides
        sizes += containers.page_sizes(im)
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels}")


def _check_budget(
    im: ImageFile.ImageFile,
    data: bytes,
    header_size: tuple[int, int],
    max_decode_mb: float | None,
    gray: bool,
) -> None:
    """Refuse a decode whose estimated peak (`decode_cost_mb`) exceeds `max_decode_mb`.

    The frame decoded is the first one at its draft scale, or for a container (ICO, ICNS,
    GIF, APNG, WebP) the largest image or canvas its headers announce. A progressive JPEG
    also holds its coefficients at full size (2 bytes each) whatever the draft scale.
    """
    if max_decode_mb is None:
        return
    size = max([im.size, *containers.embedded_sizes(data)], key=lambda s: s[0] * s[1])
    cost = decode_cost_mb(im.mode, size, gray, _has_alpha(im))
    if im.format in _JPEG_FORMATS and (im.info.get("progressive") or im.info.get("progression")):
        cost += header_size[0] * header_size[1] * 2 * len(im.getbands()) / 1e6
    if cost > max_decode_mb:
        raise ImageRejected("over_budget", f"about {cost:.0f} MB > max_decode_mb {max_decode_mb}")


def _check_transforms(transforms: Sequence[str]) -> None:
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"transforms must be among {TRANSFORMS} (got {unknown})")


def _check_trims(trims: Sequence[float]) -> None:
    if any(not 0 <= t <= MAX_TRIM for t in trims):
        raise ValueError(
            f"margin and crops must trim between 0 and {MAX_TRIM} of each side (got {list(trims)})"
        )


def _check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 (got {max_pixels})")


def _decode(im: ImageFile.ImageFile, data: bytes, gray: bool) -> Image.Image:
    """Decode every byte of the first frame, then normalise (see module notes) to L or RGB."""
    _load(im, data)
    try:
        return _to_gray(im) if gray else _to_rgb(im)
    except ImageRejected:
        raise
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported", f"mode {im.mode}: {exc}") from None


def _decode_gray(im: ImageFile.ImageFile, data: bytes, jpeg: bool, side: int) -> tuple[Image.Image, float]:
    """The grey image the hash is computed on, and the picture's mean chroma (see
    `COLOUR_CHROMA`), from one decode. A JPEG drafted in YCbCr gives both from libjpeg."""
    if jpeg and im.mode == "YCbCr":
        _load(im, data)
        return im.getchannel(0), _mean_chroma(im)
    if im.mode in ("1", "I", "F") or im.mode.startswith("I;16") or (im.mode == "L" and not _has_alpha(im)):
        return _decode(im, data, gray=True), 0.0
    rgb = _decode(im, data, gray=False)
    factor = _draft_factor(rgb.size, (side, side))
    small = rgb.reduce(factor) if factor > 1 else rgb
    return rgb.convert("L"), _mean_chroma(small.convert("YCbCr"))


def _jpeg_draft_mode(im: Image.Image) -> str:
    """YCbCr for colour JPEGs stored as YCbCr (Y is the grey libjpeg would give); RGB for
    those stored as RGB (Adobe transform 0), which libjpeg cannot turn into YCbCr."""
    if im.mode in ("RGB", "YCbCr"):
        return "RGB" if im.info.get("adobe_transform") == 0 else "YCbCr"
    return "L"


def _mean_chroma(ycbcr: Image.Image) -> float:
    pixels = np.asarray(ycbcr, dtype=np.float32)
    return float(np.hypot(pixels[..., 1] - 128, pixels[..., 2] - 128).mean()) if pixels.size else 0.0


def _load(im: ImageFile.ImageFile, data: bytes) -> None:
    try:
        im.load()
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected(_failure_reason(exc, data), str(exc)) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_to_l(im).convert("RGB")
    if mode == "F":
        raise ImageRejected("unsupported", "floating-point pixels")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def _to_gray(im: Image.Image) -> Image.Image:
    """The grey image the hash is computed on: luma of `_to_rgb`, shortcut for grey modes."""
    if im.mode == "L" and "transparency" not in im.info:
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I;16") or im.mode == "I":
        return _sixteen_to_l(im)
    return _to_rgb(im).convert("L")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in im.info and im.mode in ("1", "L", "P", "RGB")
    )


def _sixteen_to_l(im: Image.Image) -> Image.Image:
    """round(v * 255 / 65535), in strips of about a million pixels, so the working copies
    stay small beside the 16-bit frame (counted by `decode_cost_mb`)."""
    width, height = im.size
    out = np.empty((height, width), np.uint8)
    step = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        strip = np.asarray(im.crop((0, top, width, min(height, top + step)))).astype(np.int64)
        np.clip(strip, 0, 65535, out=strip)
        out[top : top + strip.shape[0]] = (strip * 255 + 32767) // 65535
    return Image.fromarray(out, "L")


def _lossless(im: Image.Image, data: bytes) -> bool:
    """The format stores pixels exactly (judged per file for TIFF and WebP)."""
    if im.format == "TIFF":
        compression = str(im.info.get("compression", "raw"))
        return "jpeg" not in compression and "webp" not in compression
    if im.format == "WEBP":
        return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and b"VP8L" in data[:4096])
    return im.format in LOSSLESS_FORMATS


def _jpeg_quality(im: Image.Image) -> int:
    """libjpeg's quality setting (1..100) that gives the luminance quantisation table, by the
    ratio of its sum to the standard table's sum (0 when there is no table)."""
    tables = getattr(im, "quantization", None) or {}
    if im.format not in _JPEG_FORMATS or 0 not in tables:
        return 0
    if max(tables[0]) <= 1:
        return 100
    scale = 100.0 * float(np.sum(tables[0])) / _STD_LUMA_SUM
    quality = (200.0 - scale) / 2 if scale <= 100 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


def _camera(im: Image.Image) -> bool:
    """EXIF names a camera (Make, Model) or a capture time (DateTimeOriginal)."""
    try:
        exif = im.getexif()
        return bool(exif.get(0x010F) or exif.get(0x0110) or exif.get_ifd(0x8769).get(0x9003))
    except Exception:
        return False


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable: bad EXIF never rejects an image)."""
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after the rotation of `orientation` (5..8 swap the sides)."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


# ---------------------------------------------------------------------------------------
# Reasons


def _unidentified_reason(data: bytes, formats: tuple[str, ...]) -> str:
    """Why no opener identified `data`: a known format whose header is damaged (asked of the
    format's own opener), an image format not read here, or not an image at all."""
    mime = sniff_mime(data)
    if is_image_mime(mime):
        fmt = _MIME_FORMAT.get(mime)
        if fmt is None or fmt not in formats:
            return "unsupported"
        factory = Image.OPEN[fmt][0]
        try:
            factory(io.BytesIO(data), "")
        except Exception as exc:
            return _failure_reason(exc, data)
        return "corrupt"
    if _known_to_pillow(data, formats):
        return "unsupported"
    return "not_an_image"


def _known_to_pillow(data: bytes, formats: tuple[str, ...]) -> bool:
    """A Pillow plugin that is not opened here recognises the signature (EPS, XBM, ...)."""
    prefix = data[:16]
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in formats or accept is None:
            continue
        try:
            found = accept(prefix)
        except Exception:
            continue
        if found and not isinstance(found, str):
            return True
    return False


def _failure_reason(exc: BaseException, data: bytes) -> str:
    if isinstance(exc, ImageRejected):
        return exc.reason
    if isinstance(exc, Image.DecompressionBombError):
        return "too_many_pixels"
    message = str(exc).lower()
    if any(word in message for word in _UNSUPPORTED_WORDS):
        return "unsupported"
    # Pillow says 'image file is truncated' when the data runs out mid-decode; other
    # decoders only report a broken stream, so the container's own sizes settle it.
    if isinstance(exc, EOFError) or "truncated" in message or _cut_short(data):
        return "truncated"
    return "corrupt"


def _cut_short(data: bytes) -> bool:
    """True when the container shows that bytes are missing at the end."""
    n = len(data)
    tail = data.rstrip(b"\x00\r\n\t ")
    if data.startswith(b"\xff\xd8"):  # JPEG ends at its EOI marker
        return not tail.endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_cut_short(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):  # ends with the trailer byte
        return not tail.endswith(b";")
    if data[:4] == b"RIFF":
        return n < struct.unpack("<I", data[4:8])[0] + 8 if n >= 8 else True
    if data[:2] == b"BM":
        return n < struct.unpack("<I", data[2:6])[0] if n >= 6 else True
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # the first IFD must lie inside the file
        if n < 8:
            return True
        offset = struct.unpack("<I" if data[:2] == b"II" else ">I", data[4:8])[0]
        return offset + 2 > n
    if data[4:8] == b"ftyp" or data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":  # ISO BMFF, JP2
        return _boxes_cut_short(data)
    if data[:4] == b"\xff\x4f\xff\x51":  # raw JPEG 2000 codestream ends with EOC
        return not tail.endswith(b"\xff\xd9")
    return False


def _png_cut_short(data: bytes) -> bool:
    pos, n = 8, len(data)
    while pos + 8 <= n:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        pos += 12 + length
        if pos > n:
            return True
        if kind == b"IEND":
            return False
    return True


def _boxes_cut_short(data: bytes) -> bool:
    pos, n = 0, len(data)
    while pos < n:
        if pos + 8 > n:
            return True
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            if pos + 16 > n:
                return True
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:  # runs to the end of the file
            return kind == b"jp2c" and not data.rstrip(b"\x00").endswith(b"\xff\xd9")
        if size < 8:
            return False  # not a box structure we can judge
        pos += size
    return pos > n


# ---------------------------------------------------------------------------------------
# Hashing and sizes


def _hasher(name: str, hash_size: int) -> Callable[[Image.Image], imagehash.ImageHash]:
    if name not in HASHES:
        raise ValueError(f"hash_name must be one of {HASHES} (got {name!r})")
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2 (got {hash_size})")
    if name == "phash":
        return lambda im: imagehash.phash(im, hash_size=hash_size)
    if name == "dhash":
        return lambda im: imagehash.dhash(im, hash_size=hash_size)
    if name == "ahash":
        return lambda im: imagehash.average_hash(im, hash_size=hash_size)
    if hash_size & (hash_size - 1):
        raise ValueError(f"whash needs a power-of-two hash_size (got {hash_size})")
    # imagehash's default scale is the largest power of two under the image's shorter side,
    # i.e. it would depend on the decode scale; a fixed scale keeps the hash about the picture.
    scale = _whash_scale(hash_size)
    return lambda im: imagehash.whash(im, hash_size=hash_size, image_scale=scale)


def _whash_scale(hash_size: int) -> int:
    return 8 * hash_size


def hash_side(hash_size: int) -> int:
    """Shorter side the hash input keeps at least: 6x the 4*hash_size pixels phash resizes to
    (192 for hash_size 8). Measured on 200 photo-like JPEGs (bench/ingest.py): at 4x (128)
    the draft hash was up to 4 bits from imagehash on the full decode and near copies drifted
    twice as far; at 6x it is within 2 bits and near copies stay as close as with a full
    decode. Also >= the fixed whash scale (8*hash_size)."""
    return max(128, 24 * hash_size)


def _draft_factor(size: tuple[int, int], need: tuple[int, int]) -> int:
    """The reduction libjpeg's draft picks: the largest of 8, 4, 2, 1 keeping >= `need`."""
    ratio = min(size[0] // max(1, need[0]), size[1] // max(1, need[1]))
    for factor in (8, 4, 2):
        if ratio >= factor:
            return factor
    return 1


def _fill_size(size: tuple[int, int], out: tuple[int, int], fit: str) -> tuple[int, int]:
    """Size (width, height) the whole picture takes once scaled for `fit` into `out`."""
    width, height = size
    if fit == "stretch":
        return out
    ratios = (out[0] / width, out[1] / height)
    ratio = min(ratios) if fit == "pad" else max(ratios)
    return max(1, math.ceil(width * ratio)), max(1, math.ceil(height * ratio))


def _fit(im: Image.Image, out: tuple[int, int], fit: str) -> Image.Image:
    out_w, out_h = out
    width, height = im.size
    if fit == "stretch":
        return im.resize(out, RESAMPLE, reducing_gap=REDUCING_GAP)
    if fit == "crop":
        ratio = max(out_w / width, out_h / height)
        crop_w, crop_h = out_w / ratio, out_h / ratio
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        box = (left, top, left + crop_w, top + crop_h)
        return im.resize(out, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    ratio = min(out_w / width, out_h / height)
    inner = (
        min(out_w, max(1, round(width * ratio))),
        min(out_h, max(1, round(height * ratio))),
    )
    canvas = Image.new("RGB", out, (0, 0, 0))
    canvas.paste(
        im.resize(inner, RESAMPLE, reducing_gap=REDUCING_GAP),
        ((out_w - inner[0]) // 2, (out_h - inner[1]) // 2),
    )
    return canvas
