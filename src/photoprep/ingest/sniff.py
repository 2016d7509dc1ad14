"""Content type from magic bytes: what a payload is, whatever the server claimed."""

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
    (b"%PDF", "application/pdf"),
)

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
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "image/avif" if head[8:12] == b"avif" else "image/heic"
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
