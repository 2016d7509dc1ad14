"""Content type from magic bytes: what a payload is, whatever the server claimed.

The decoder identifies images by Pillow's own openers; this sniff names what a payload is
when no opener identifies it (markup, JSON, text: not an image; an image format that no
opener here reads, such as JPEG XL, OpenEXR or HEIC without pillow-heif: unsupported).
"""

from __future__ import annotations

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"\x00\x00\x02\x00", "image/x-icon"),  # CUR
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "image/jp2"),
    (b"\xff\x4f\xff\x51", "image/jp2"),  # raw JPEG 2000 codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "image/jxl"),
    (b"\xff\x0a", "image/jxl"),
    (b"\x76\x2f\x31\x01", "image/x-exr"),
    (b"icns", "image/x-icns"),
    (b"8BPS", "image/vnd.adobe.photoshop"),
    (b"qoif", "image/qoi"),
    (b"DDS ", "image/vnd-ms.dds"),
    (b"\x01\xda\x00", "image/x-sgi"),  # SGI: magic 474, then uncompressed; \x01\xda\x01: RLE
    (b"\x01\xda\x01", "image/x-sgi"),
    (b"%PDF", "application/pdf"),
)
_NETPBM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7", b"Pf", b"PF")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")

_TEXT_PREFIXES: tuple[tuple[bytes, str], ...] = (
    (b"<!doctype html", "text/html"),
    (b"<html", "text/html"),
    (b"<head", "text/html"),
    (b"<body", "text/html"),
    (b"<svg", "image/svg+xml"),
    (b"{", "application/json"),
    (b"[", "application/json"),
)


def sniff_mime(data: bytes) -> str:
    """The MIME type that the first bytes of `data` announce; 'empty' for no bytes."""
    if not data:
        return "empty"
    head = data[:64]
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp" and (head[8:12] in (b"avif", b"avis") or head[8:12] in _HEIF_BRANDS):
        return "image/avif" if head[8:12] in (b"avif", b"avis") else "image/heic"
    if head[:2] in _NETPBM and head[2:3] in (b" ", b"\t", b"\r", b"\n"):
        return "image/x-portable-anymap"
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml"):
        return "image/svg+xml" if b"<svg" in data[:2048].lower() else "application/xml"
    for prefix, mime in _TEXT_PREFIXES:
        if text.startswith(prefix):
            return mime
    sample = data[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return "text/plain"
    return "application/octet-stream"


def is_image_mime(mime: str) -> bool:
    """True for raster formats a decoder may open (SVG is markup, not a raster)."""
    return mime.startswith("image/") and mime != "image/svg+xml"
