"""Real pictures for the image tests (scikit-image sample photos, the scikit-learn digits), and
the payloads made of them: encodings, bombs, orientation tags, a 16-bit PNG, an ICO around a PNG."""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import cv2
import numpy as np
import skimage.data
from PIL import Image
from skimage import data as samples
from sklearn.datasets import load_digits

from photoprep.images.decode import open_rgb


@cache
def astronaut() -> np.ndarray:
    return samples.astronaut()  # 512 x 512 RGB


@cache
def coffee() -> np.ndarray:
    return samples.coffee()  # 400 x 600 RGB


@cache
def chelsea() -> np.ndarray:
    return samples.chelsea()  # 300 x 451 RGB


@cache
def camera() -> np.ndarray:
    return samples.camera()  # 512 x 512 grey


@cache
def digits() -> tuple[np.ndarray, str]:
    bunch = load_digits()
    return (bunch.images * (255 / 16)).round().astype(np.uint8), bunch.DESCR


def digit(i: int, scale: int = 8) -> np.ndarray:
    """Digit i as a 64 x 64 grey image."""
    return np.kron(digits()[0][i], np.ones((scale, scale), np.uint8))


def encode(image: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


@cache
def astronaut_jpeg() -> bytes:
    return encode(astronaut(), "JPEG", quality=90)


@cache
def big_jpeg() -> bytes:
    """2048 x 2048 photo (astronaut tiled), about 1 MB."""
    return encode(np.tile(astronaut(), (4, 4, 1)), "JPEG", quality=90)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height: a digit in the top-left corner, white elsewhere,
    streamed through zlib row by row, so a few tens of KB hold hundreds of megapixels."""
    row_bytes = (width + 7) // 8
    picture = np.packbits(digit(3) > 127, axis=1)
    compressor = zlib.compressobj(9)
    blank = b"\x00" + bytes(row_bytes)
    parts = []
    for y in range(height):
        if y < picture.shape[0]:
            row = picture[y].tobytes() + bytes(row_bytes - picture.shape[1])
            parts.append(compressor.compress(b"\x00" + row))
        else:
            parts.append(compressor.compress(blank))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def with_orientation(image: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    return encode(image, fmt, exif=exif.tobytes(), **options)


def rgb_of(payload: bytes) -> np.ndarray:
    return np.asarray(open_rgb(payload))


def ico_around(png: bytes, header_side: int = 16) -> bytes:
    """An ICO whose directory says header_side x header_side around an embedded PNG."""
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", header_side, header_side, 0, 0, 1, 32, len(png), 6 + 16)
    return directory + entry + png


def sixteen_bit_grey_png(width: int, height: int) -> bytes:
    """A real 16-bit grey PNG: the camera photo (scaled to 16 bits) in the top-left corner,
    black elsewhere, streamed through zlib row by row."""
    picture = (camera().astype(">u2") * 257).astype(">u2")
    compressor = zlib.compressobj(1)
    blank = b"\x00" + bytes(2 * width)
    parts = []
    for y in range(height):
        if y < picture.shape[0]:
            row = picture[y].tobytes() + bytes(2 * (width - picture.shape[1]))
            parts.append(compressor.compress(b"\x00" + row))
        else:
            parts.append(compressor.compress(blank))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def peak_reset_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return "VmHWM" in f.read()
    except OSError:
        return False


def verdict(record: dict) -> dict:
    """The header and verdict fields of a probe record (a rejected record has no hashes)."""
    assert record["hash"] == record["crop_hashes"] == record["transform_hashes"] == ""
    return {key: record[key] for key in ("format", "width", "height", "mode", "valid", "reason", "hash")}


def shrunk_photos(hw: tuple[int, int]) -> np.ndarray:
    """Real photos from skimage.data, shrunk to ``hw`` = (H, W): uint8 N x H x W x 3."""
    rgbs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    camera = skimage.data.camera()
    rgbs.append(np.repeat(camera[:, :, None], 3, axis=2))
    return np.stack([cv2.resize(im, hw[::-1], interpolation=cv2.INTER_AREA) for im in rgbs])


def shrunk_crops(n: int, hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``n`` different uint8 images of ``hw``: random crops of real photos, shrunk."""
    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        top, left = rng.integers(0, im.shape[0] // 2), rng.integers(0, im.shape[1] // 2)
        out.append(cv2.resize(im[top:, left:], hw[::-1], interpolation=cv2.INTER_AREA))
    return np.stack(out)
