"""Sizes of every image a file holds, read from its headers: no pixel is decoded or allocated.

Pillow sizes a container by one header, and that header may lie about what a decode would
allocate: an ICO's directory may say 16x16 around an embedded 9000x9000 PNG (Pillow decodes
the PNG at its own size), a GIF frame or an APNG/WebP frame may be larger than the canvas,
and a TIFF or MPO holds further pages. `embedded_sizes` walks the container's own structure
(ICO/CUR directory entries and the PNG or BMP header of each, ICNS entries, GIF image
descriptors, APNG frame controls, WebP canvas, frames and bitstream headers) and returns
every (width, height) it finds; `photoprep.images.decode` checks each against
`max_pixels` and the decode budget before anything is decoded. TIFF and MPO pages are sized
by Pillow's own header parsing of each page (`Image.seek` reads a page's header only).

A structure that cannot be walked to its end gives the sizes read so far: the decode that
follows reports the damage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
MAX_PAGES = 10_000
"""Pages of a TIFF or MPO that are sized; a file with more is sized by its first MAX_PAGES."""

Size = tuple[int, int]


def embedded_sizes(data: bytes) -> list[Size]:
    """(width, height) of every image, frame or page inside `data` that its headers state.

    Empty for formats that hold a single image (the size Pillow reads is then the size).
    """
    head = data[:16]
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return list(_ico_sizes(data))
    if head[:4] == b"icns":
        return list(_icns_sizes(data))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return list(_gif_sizes(data))
    if head[:8] == PNG_MAGIC:
        return list(_png_sizes(data))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return list(_webp_sizes(data))
    return []


def decodes_on_open(data: bytes) -> bool:
    """Pillow's ICO, CUR and ICNS openers decode their largest image while opening."""
    return format_of(data) in ("ICO", "CUR", "ICNS")


def format_of(data: bytes) -> str:
    """The Pillow format name of a container that `embedded_sizes` walks ("" for others)."""
    head = data[:12]
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if head[:4] == b"\x00\x00\x02\x00":
        return "CUR"
    if head[:4] == b"icns":
        return "ICNS"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:8] == PNG_MAGIC:
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return ""


def page_sizes(im: Image.Image) -> list[Size]:
    """Sizes of the pages of a multi-page file (TIFF, MPO) from each page's header; the
    image is left on its first page."""
    frames = getattr(im, "n_frames", 1)
    if frames <= 1 or im.format not in ("TIFF", "MPO"):
        return []
    sizes = []
    try:
        for page in range(min(frames, MAX_PAGES)):
            im.seek(page)
            sizes.append(im.size)
    finally:
        im.seek(0)
    return sizes


def _png_ihdr(data: bytes, start: int = 0) -> Size | None:
    if data[start : start + 8] != PNG_MAGIC or len(data) < start + 24:
        return None
    width, height = struct.unpack(">II", data[start + 16 : start + 24])
    return width, height


def _ico_sizes(data: bytes) -> Iterator[Size]:
    if len(data) < 6:
        return
    (count,) = struct.unpack("<H", data[4:6])
    for entry in range(count):
        at = 6 + 16 * entry
        if at + 16 > len(data):
            return
        width, height = data[at] or 256, data[at + 1] or 256
        yield width, height
        _size, offset = struct.unpack("<II", data[at + 8 : at + 16])
        png = _png_ihdr(data, offset)
        if png is not None:
            yield png
        elif offset + 12 <= len(data):
            # A BMP without its file header: the DIB header's height counts the AND mask too.
            dib_width, dib_height = struct.unpack("<ii", data[offset + 4 : offset + 12])
            yield abs(dib_width), abs(dib_height) // 2


def _icns_sizes(data: bytes) -> Iterator[Size]:
    pos, end = 8, min(len(data), struct.unpack(">I", data[4:8])[0] if len(data) >= 8 else 0)
    while pos + 8 <= end:
        length = struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        if length < 8:
            return
        body = data[pos + 8 : pos + length]
        png = _png_ihdr(body)
        if png is not None:
            yield png
        elif body[:12] == _JP2_MAGIC or body[:4] == b"\xff\x4f\xff\x51":
            jp2 = _jpeg2000_size(body)
            if jp2 is not None:
                yield jp2
        pos += length


def _jpeg2000_size(data: bytes) -> Size | None:
    """From the codestream's SIZ marker (raw codestream or inside a JP2's jp2c box)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 24 > len(data):
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", data[at + 8 : at + 24])
    return max(0, xsiz - x0), max(0, ysiz - y0)


def _gif_sizes(data: bytes) -> Iterator[Size]:
    if len(data) < 13:
        return
    screen_w, screen_h, flags = struct.unpack("<HHB", data[6:11])
    yield screen_w, screen_h
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            return
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor: left, top, width, height, flags
            if pos + 10 > len(data):
                return
            left, top, width, height, local = struct.unpack("<HHHHB", data[pos + 1 : pos + 10])
            yield left + width, top + height
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW minimum code size
        else:
            return
        if pos < 0:
            return


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data):
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos
    return -1


def _png_sizes(data: bytes) -> Iterator[Size]:
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"fcTL" and pos + 8 + 20 <= len(data):  # APNG frame: sequence, w, h, x, y
            width, height, left, top = struct.unpack(">IIII", data[pos + 12 : pos + 28])
            yield left + width, top + height
        elif kind == b"IEND":
            return
        pos += 12 + length


def _webp_sizes(data: bytes) -> Iterator[Size]:
    pos, end = 12, min(len(data), 8 + struct.unpack("<I", data[4:8])[0])
    while pos + 8 <= end:
        kind, length = struct.unpack("<4sI", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"VP8X" and len(body) >= 10:
            yield _u24(body, 4) + 1, _u24(body, 7) + 1
        elif kind == b"ANMF" and len(body) >= 16:
            left, top = 2 * _u24(body, 0), 2 * _u24(body, 3)
            yield left + _u24(body, 6) + 1, top + _u24(body, 9) + 1
            yield from _webp_bitstreams(body[16:])
        elif kind in (b"VP8 ", b"VP8L"):
            yield from _webp_bitstreams(data[pos:end])
        pos += 8 + length + (length & 1)


def _webp_bitstreams(chunks: bytes) -> Iterator[Size]:
    """The size each VP8/VP8L bitstream header announces, in a run of chunks."""
    pos = 0
    while pos + 8 <= len(chunks):
        kind, length = struct.unpack("<4sI", chunks[pos : pos + 8])
        body = chunks[pos + 8 : pos + 8 + length]
        if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", body[6:10])
            yield width & 0x3FFF, height & 0x3FFF
        elif kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            yield (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        pos += 8 + length + (length & 1)


def _u24(body: bytes, at: int) -> int:
    return int.from_bytes(body[at : at + 3], "little")


def describe(sizes: list[Size]) -> str:
    """The largest size, for a rejection's detail."""
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return f"{width}x{height}"
