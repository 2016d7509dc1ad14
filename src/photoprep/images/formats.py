"""Image formats, and the reasons a payload is not an image photoprep can use.

Formats are identified by Pillow's own openers (`OPENED_FORMATS`, tried in order, the
weak-signature TGA last); the magic-byte sniff only names the reason when none of them
identifies the bytes: markup, JSON, text and unknown binary are ``not_an_image``, a known
image format that no opener here reads (EPS, which would run Ghostscript; HEIC without
pillow-heif; JPEG XL, OpenEXR) is ``unsupported``. HEIF opens where pillow-heif is installed
(`register_plugins`).

A bad image is never an exception to the probe's caller: it is a record with one of the
decode's reasons (`photoprep.images.reasons`). Inside the decode it travels as `ImageRejected`.
A decoder's error is named by `failure_reason`: Pillow says 'image file is truncated' when data
runs out mid-decode, other decoders only report a broken stream, so the container's own sizes
settle ``truncated`` against ``corrupt``.

Why by hand: the end-of-file checks read a few container fields (PNG chunks,
ISO boxes, the BMP and RIFF sizes) that Pillow does not expose after a failed decode.
"""

from __future__ import annotations

import io
import struct

import imagehash
from PIL import Image, features

from photoprep.ingest.sniff import is_image_mime, sniff_mime

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
"""Pillow formats the decode tries, in this order; HEIF counts only where pillow-heif is
installed. MPO (multi-picture JPEG) comes in through the JPEG opener; PPM reads every Netpbm
file (PBM, PGM, PPM, PAM, PFM). TGA has no magic number, so it is tried last."""


LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "PPM", "QOI", "PSD", "SGI", "PCX", "TGA", "ICO", "CUR", "ICNS"})
"""Formats whose pixels are stored exactly (TIFF unless JPEG-compressed, and lossless WebP,
are judged per file)."""


JPEG_FORMATS = frozenset({"JPEG", "MPO"})
"""Formats decoded by libjpeg (MPO is a multi-picture JPEG): drafts, quantisation tables."""


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
    """An image that cannot be used; `reason` is one of `DECODE_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def opened_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in OPENED_FORMATS if fmt in Image.OPEN)


def unidentified_reason(data: bytes, formats: tuple[str, ...]) -> str:
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
            return failure_reason(exc, data)
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


def failure_reason(exc: BaseException, data: bytes) -> str:
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


def stores_exactly(im: Image.Image, data: bytes) -> bool:
    """The format stores pixels exactly (judged per file for TIFF and WebP)."""
    if im.format == "TIFF":
        compression = str(im.info.get("compression", "raw"))
        return "jpeg" not in compression and "webp" not in compression
    if im.format == "WEBP":
        return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and b"VP8L" in data[:4096])
    return im.format in LOSSLESS_FORMATS


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
