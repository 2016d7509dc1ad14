"""The one guarded decode: open by Pillow's openers, refuse bombs from headers, decode, normalise.

Every decode photoprep does (the dedup stage's probe, the bucket stage's resize, the contact
sheets' thumbnails, the keep rule's provenance) goes through here, so none can skip a guard.

Limits (`DecodeLimits`) hold on what a decode would allocate, decided from headers before any
pixel is decoded: every embedded image, frame and page (`photoprep.images.containers`) must be
within `max_pixels`, and with `max_decode_mb` the estimated peak of the decode
(`decode_cost_mb`: the decoded frame at its draft scale plus the normalisation's working
copies) must fit the budget, else ``over_budget``. JPEGs may be decoded by libjpeg at reduced
scale (`Image.draft`): the scaled IDCT is cheaper, but the whole entropy-coded stream is still
read, so truncation and broken streams are still caught.

Normalisation to RGB (`open_rgb`, `upright_rgb`, and the grey image the probe hashes):

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

Known limit: random bytes inside a JPEG's entropy-coded data are repaired by libjpeg with
a warning only, and Pillow does not surface libjpeg warnings, so such an image is valid
here (smeared blocks); bytes that form markers (0xFF runs, a stray frame header) are fatal
to libjpeg and give ``corrupt``.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from photoprep.core.params import Params
from photoprep.images import containers
from photoprep.images.formats import (
    JPEG_FORMATS,
    ImageRejected,
    failure_reason,
    opened_formats,
    unidentified_reason,
)
from photoprep.ingest.sniff import sniff_mime


@dataclass(frozen=True)
class DecodeLimits:
    """What a decode may allocate: pixels of its largest frame, and the estimated peak in MB
    (None: no budget)."""

    max_pixels: int = 50_000_000
    max_decode_mb: float | None = None

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 (got {self.max_pixels})")

    @classmethod
    def from_params(cls, p: Params) -> DecodeLimits:
        """The limits of params.yaml's `decode` section."""
        return cls(p.decode.max_pixels, p.decode.max_decode_mb)

    @classmethod
    def after_probe(cls, p: Params) -> DecodeLimits:
        """The limits of a later decode of bytes the probe passed (resize, thumbnails): the pixel
        count alone, so that a valid image is never refused for a budget its RGB decode (larger
        than the probe's grey one) would exceed."""
        return cls(p.decode.max_pixels)


NO_BUDGET = DecodeLimits()
"""50 megapixels, no budget: the defaults of the decode functions."""

# Orientation is read after decoding for these: a PNG's eXIf chunk may follow the pixels, and
# Pillow turns TIFFs upright itself (reporting the upright size from the header on), then
# drops the tag, so reading it after the decode gives 1 and no second rotation.
LATE_EXIF = frozenset({"PNG", "TIFF"})


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


_STRIP_PIXELS = 1 << 20


def open_rgb(
    data: bytes, limits: DecodeLimits = NO_BUDGET, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode `data` to an upright RGB image (see the module notes), or raise ImageRejected.

    The pixel count is checked from the headers before anything is decoded. With
    `draft_size` = (width, height), upright, a JPEG may be decoded at reduced scale (1/2,
    1/4, 1/8) but never below that size on either side; other formats decode in full.
    """
    return upright_rgb(data, limits, lambda upright_size: draft_size)


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


class _Quiet:
    """One `warnings.catch_warnings` scope shared by the threads that decode at once (the bucket
    stage's resize runs in threads): the first to enter opens it, the last to leave closes it.
    A scope of its own a thread is not safe, since warnings' filters are the process's: a thread
    leaving would put back the filters it found, which may be another thread's "ignore", left
    on for the rest of the stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.scope: warnings.catch_warnings[None] | None = None

    def enter(self) -> None:
        with self.lock:
            if not self.inside:
                self.scope = warnings.catch_warnings()
                self.scope.__enter__()
                warnings.simplefilter("ignore")
            self.inside += 1

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1
            if not self.inside and self.scope is not None:
                self.scope.__exit__(None, None, None)
                self.scope = None


_QUIET = _Quiet()


@contextmanager
def pillow_quiet() -> Iterator[None]:
    """Silence Pillow's per-image warnings (bomb size, odd EXIF, palette transparency): the
    outcome is in the record. Scoped, so no global setting is left changed (`_Quiet`)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: photoprep.images.decode needs it False "
            "to detect truncated images; whoever set it should set it back"
        )
    _QUIET.enter()
    try:
        yield
    finally:
        _QUIET.leave()


def upright_rgb(
    data: bytes, limits: DecodeLimits, draft_for: Callable[[tuple[int, int]], tuple[int, int] | None]
) -> Image.Image:
    """Open, check, decode and normalise to upright RGB. `draft_for(upright size)` gives the
    smallest upright (width, height) a JPEG may be decoded at, or None for full scale."""
    with pillow_quiet():
        im = open_image(data, limits, gray=False)
        check_pixels(im, data, limits.max_pixels)
        header_size = im.size
        orientation = exif_orientation(im) if im.format not in LATE_EXIF else 1
        if im.format in JPEG_FORMATS:
            need = draft_for(oriented(im.size, orientation))
            if need is not None:
                width, height = oriented(need, orientation)  # back to stored orientation
                im.draft("RGB", (max(1, width), max(1, height)))
        check_budget(im, data, header_size, limits.max_decode_mb, gray=False)
        rgb = normalised(im, data, gray=False)
        if im.format in LATE_EXIF:
            orientation = exif_orientation(im)
        return turn_upright(rgb, orientation)


def open_image(data: bytes, limits: DecodeLimits, gray: bool) -> ImageFile.ImageFile:
    """Identify `data` by Pillow's openers and read its header; no pixel is decoded.

    Pillow's ICO and ICNS openers decode their largest image while opening, so the sizes
    that a container's headers announce are checked first (`_check_embedded`)."""
    if not data:
        raise ImageRejected("zero_bytes")
    _check_embedded(data, limits, gray)
    formats = opened_formats()
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS) said no; ours decides.
        return _open_unchecked(data, formats)
    except UnidentifiedImageError:
        raise ImageRejected(unidentified_reason(data, formats), sniff_mime(data)) from None
    except Exception as exc:  # a plugin failing in an unplanned way on bad bytes
        raise ImageRejected(failure_reason(exc, data), str(exc)) from None


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


def _check_embedded(data: bytes, limits: DecodeLimits, gray: bool) -> None:
    """Before opening: every size a container's headers announce within `max_pixels`, and
    for the containers Pillow decodes while opening, its largest image (taken as RGBA) within
    the budget."""
    sizes = containers.embedded_sizes(data)
    if not sizes:
        return
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    if width * height > limits.max_pixels:
        raise ImageRejected("too_many_pixels", f"an embedded {width}x{height} > {limits.max_pixels}")
    if limits.max_decode_mb is not None and containers.decodes_on_open(data):
        cost = decode_cost_mb("RGBA", (width, height), gray, alpha=True)
        if cost > limits.max_decode_mb:
            raise ImageRejected("over_budget", f"about {cost:.0f} MB > max_decode_mb {limits.max_decode_mb}")


def check_pixels(im: Image.Image, data: bytes, max_pixels: int) -> None:
    """Every image, frame and page the headers announce must be within `max_pixels`."""
    sizes = [im.size, *containers.embedded_sizes(data)]
    with suppress(Exception):  # a damaged later page: the first page's decode still decides
        sizes += containers.page_sizes(im)
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels}")


def check_budget(
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
    cost = decode_cost_mb(im.mode, size, gray, has_alpha(im))
    if im.format in JPEG_FORMATS and (im.info.get("progressive") or im.info.get("progression")):
        cost += header_size[0] * header_size[1] * 2 * len(im.getbands()) / 1e6
    if cost > max_decode_mb:
        raise ImageRejected("over_budget", f"about {cost:.0f} MB > max_decode_mb {max_decode_mb}")


def normalised(im: ImageFile.ImageFile, data: bytes, gray: bool) -> Image.Image:
    """Decode every byte of the first frame, then normalise (see module notes) to L or RGB."""
    load(im, data)
    try:
        return _to_gray(im) if gray else _to_rgb(im)
    except ImageRejected:
        raise
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported", f"mode {im.mode}: {exc}") from None


def load(im: ImageFile.ImageFile, data: bytes) -> None:
    """Decode every byte of the first frame; a decoder's error becomes `ImageRejected`."""
    try:
        im.load()
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected(failure_reason(exc, data), str(exc)) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_to_l(im).convert("RGB")
    if mode == "F":
        raise ImageRejected("unsupported", "floating-point pixels")
    if has_alpha(im):
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


def has_alpha(im: Image.Image) -> bool:
    """The image has transparency: an alpha band, or a transparent colour."""
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


def exif_orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable: bad EXIF never rejects an image)."""
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after the rotation of `orientation` (5..8 swap the sides)."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def turn_upright(im: Image.Image, orientation: int) -> Image.Image:
    """`im` as EXIF `orientation` says it is to be seen."""
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def draft_factor(size: tuple[int, int], need: tuple[int, int]) -> int:
    """The reduction libjpeg's draft picks: the largest of 8, 4, 2, 1 keeping >= `need`."""
    ratio = min(size[0] // max(1, need[0]), size[1] // max(1, need[1]))
    for factor in (8, 4, 2):
        if ratio >= factor:
            return factor
    return 1
