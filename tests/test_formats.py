"""Formats and reasons (`photoprep.images.formats`): every format Pillow reads is kept, and a payload
that is not a usable image gets the reason that says why.
"""

from __future__ import annotations

import io
import json
import struct

import imagehash
import numpy as np
import pytest
from pictures import (
    astronaut,
    astronaut_jpeg,
    big_jpeg,
    camera,
    chelsea,
    coffee,
    digit,
    digits,
    encode,
    rgb_of,
    verdict,
)
from PIL import Image

from photoprep.images.decode import open_rgb
from photoprep.images.formats import ImageRejected
from photoprep.images.probe import probe
from photoprep.images.reasons import DECODE_REASONS
from photoprep.images.resize import resized_rgb
from photoprep.ingest.sniff import sniff_mime

# -- reasons -------------------------------------------------------------------------------


def test_empty_payload_is_zero_bytes():
    assert verdict(probe(b"")) == {
        "format": "",
        "width": 0,
        "height": 0,
        "mode": "",
        "valid": False,
        "reason": "zero_bytes",
        "hash": "",
    }


def _not_images() -> dict[str, bytes]:
    pixels, descr = digits()
    return {
        "html": b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>"
        + descr.encode()[:500]
        + b"</body></html>",
        "json": json.dumps({"error": "rate limited", "digit": pixels[0].tolist()}).encode(),
        "svg": (
            '<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            + "".join(
                f'<rect x="{x}" y="{y}" width="8" height="8" fill="#{v:02x}{v:02x}{v:02x}"/>'
                for (y, x), v in np.ndenumerate(pixels[0])
                if v
            )
            + "</svg>"
        ).encode(),
        "text": descr.encode(),
        "random": np.random.default_rng(7).bytes(20_000),
    }


@pytest.mark.parametrize("kind", ["html", "json", "svg", "text", "random"])
def test_payloads_that_are_not_images(kind):
    record = probe(_not_images()[kind])
    assert (record["valid"], record["reason"], record["format"]) == (False, "not_an_image", "")
    assert record["hash"] == ""
    with pytest.raises(ImageRejected) as rejected:
        open_rgb(_not_images()[kind])
    assert rejected.value.reason == "not_an_image"


def test_jpeg_cut_at_half_is_truncated():
    payload = astronaut_jpeg()
    record = probe(payload[: len(payload) // 2])
    assert (record["format"], record["width"], record["valid"]) == ("JPEG", 512, False)
    assert record["reason"] == "truncated"


def test_big_jpeg_cut_just_before_its_end_marker_is_truncated():
    payload = big_jpeg()
    assert payload.endswith(b"\xff\xd9")
    for cut in (payload[:-2], payload[:-1], payload[:-40]):
        assert probe(cut)["reason"] == "truncated"


def test_truncation_is_caught_by_a_reduced_scale_draft_decode():
    cut = big_jpeg()[:-2]
    im = Image.open(io.BytesIO(cut))
    im.draft("L", (128, 128))
    assert im.size == (256, 256)  # libjpeg decodes at 1/8 scale...
    with pytest.raises(OSError, match="truncated"):
        im.load()  # ...but still reads the whole entropy-coded stream
    # probe and resized_rgb decode at reduced scale too, and say so
    assert probe(cut)["reason"] == "truncated"
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(cut, (64, 64))
    assert rejected.value.reason == "truncated"


def test_progressive_jpeg_cut_is_truncated():
    payload = encode(coffee(), "JPEG", quality=90, progressive=True)
    assert probe(payload)["valid"]
    assert probe(payload[: len(payload) * 2 // 3])["reason"] == "truncated"


def test_jpeg_cut_inside_its_header_is_truncated():
    assert probe(astronaut_jpeg()[:300])["reason"] == "truncated"


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.99])
def test_png_cut_is_truncated(fraction):
    payload = encode(chelsea(), "PNG")
    assert probe(payload[: int(len(payload) * fraction)])["reason"] == "truncated"


def test_png_missing_only_its_end_chunk_keeps_all_pixels_and_is_valid():
    payload = encode(chelsea(), "PNG")
    assert payload.endswith(b"IEND\xaeB`\x82")
    assert probe(payload[:-12])["valid"]


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP", "JPEG2000", "AVIF"])
def test_other_formats_cut_short_are_truncated(fmt):
    payload = encode(coffee(), fmt)
    assert probe(payload)["valid"]
    assert probe(payload[: len(payload) * 3 // 4])["reason"] == "truncated"


def _jpeg_with_middle(replacement: bytes) -> bytes:
    payload = bytearray(astronaut_jpeg())
    middle = len(payload) // 2
    payload[middle : middle + len(replacement)] = replacement
    return bytes(payload)


def test_jpeg_with_a_run_of_ff_in_its_scan_is_corrupt():
    # 0xFF bytes read as markers inside the entropy-coded data: libjpeg stops with a fatal
    # error ("broken data stream") although the file is complete up to its EOI.
    record = probe(_jpeg_with_middle(b"\xff" * 64))
    assert (record["format"], record["valid"], record["reason"]) == ("JPEG", False, "corrupt")


def test_jpeg_with_a_stray_frame_marker_in_its_scan_is_corrupt():
    assert probe(_jpeg_with_middle(b"\xff\xc0\x00\x11"))["reason"] == "corrupt"


def test_jpeg_with_random_bytes_in_its_scan_decodes_as_valid():
    # A known limit: libjpeg resynchronises on random garbage and only warns; Pillow does not
    # expose libjpeg warnings, so the damage shows as smeared blocks, not as a reason.
    noisy = _jpeg_with_middle(np.random.default_rng(0).bytes(64))
    assert probe(noisy)["valid"]
    assert probe(_jpeg_with_middle(bytes(1024)))["valid"]


def test_png_with_garbage_in_its_pixel_stream_is_corrupt():
    payload = bytearray(encode(chelsea(), "PNG"))
    middle = len(payload) // 2
    payload[middle : middle + 64] = np.random.default_rng(1).bytes(64)
    assert probe(bytes(payload))["reason"] == "corrupt"


def test_heic_without_a_decoder_is_unsupported():
    # An ISO-BMFF file branded HEIC (the picture inside is a JPEG in the media box): a real
    # image format, but no HEIF plugin is registered here.
    brand = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    payload = struct.pack(">I", 8 + len(brand)) + brand
    payload += struct.pack(">I", 8 + len(astronaut_jpeg())) + b"mdat" + astronaut_jpeg()
    if "HEIF" in Image.registered_extensions().values():
        pytest.skip("a HEIF plugin is installed here")
    assert probe(payload)["reason"] == "unsupported"


def test_float_image_is_unsupported():
    payload = encode(Image.fromarray(camera().astype(np.float32) / 255, "F"), "TIFF")
    record = probe(payload)
    assert (record["format"], record["mode"], record["reason"]) == ("TIFF", "F", "unsupported")
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(payload, (32, 32))
    assert rejected.value.reason == "unsupported"


def test_every_reason_is_listed():
    assert set(DECODE_REASONS) == {
        "zero_bytes",
        "not_an_image",
        "truncated",
        "corrupt",
        "too_many_pixels",
        "over_budget",
        "unsupported",
    }


# -- formats: identified by Pillow's openers, one real file each -------------------------------


def _netpbm_plain(magic: str, pixels: np.ndarray, maxval: int | None) -> bytes:
    """A plain (ASCII) Netpbm file as netpbm's own tools write it."""
    height, width = pixels.shape[:2]
    header = f"{magic}\n# written by photoprep's tests\n{width} {height}\n" + (
        f"{maxval}\n" if maxval else ""
    )
    rows = "\n".join(" ".join(str(int(v)) for v in row.reshape(-1)) for row in pixels)
    return (header + rows + "\n").encode()


def _psd(picture: np.ndarray) -> bytes:
    """A flat 8-bit RGB Photoshop file: header, empty colour-mode, resource and layer
    sections, then raw planar channels (what Photoshop writes for a flattened image)."""
    height, width = picture.shape[:2]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)
    planes = b"".join(np.ascontiguousarray(picture[..., c]).tobytes() for c in range(3))
    return header + sections + struct.pack(">H", 0) + planes


def _cur(picture: np.ndarray) -> bytes:
    """A Windows cursor: an ICO with BMP entries and type 2 (the hotspot in place of the
    planes and bit count)."""
    ico = bytearray(encode(Image.fromarray(picture), "ICO", sizes=[(32, 32)], bitmap_format="bmp"))
    ico[2:4] = struct.pack("<H", 2)
    ico[10:14] = struct.pack("<HH", 16, 16)
    return bytes(ico)


def _mpo(picture: np.ndarray) -> bytes:
    first = Image.fromarray(picture)
    second = Image.fromarray(np.ascontiguousarray(picture[:, ::-1]))
    return encode(first, "MPO", save_all=True, append_images=[second], quality=95)


def _small(picture: np.ndarray, width: int = 120) -> np.ndarray:
    im = Image.fromarray(picture)
    return np.asarray(im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS))


FORMATS = {
    # name: (payload builder, format, mode, (width, height), source picture the pixels match)
    "pbm_binary": (lambda: encode(Image.fromarray(digit(4) > 100), "PPM"), "PPM", "1", (64, 64), None),
    "pgm_binary": (lambda: encode(camera(), "PPM"), "PPM", "L", (512, 512), camera),
    "ppm_binary": (lambda: encode(chelsea(), "PPM"), "PPM", "RGB", (451, 300), chelsea),
    "pgm_16bit": (
        lambda: encode(Image.fromarray(camera().astype(np.uint16) * 257), "PPM"),
        "PPM",
        "I",
        (512, 512),
        camera,
    ),
    "pbm_plain": (
        lambda: _netpbm_plain("P1", (digit(4) <= 100).astype(int), None),
        "PPM",
        "1",
        (64, 64),
        None,
    ),
    "pgm_plain": (
        lambda: _netpbm_plain("P2", _small(camera(), 60), 255),
        "PPM",
        "L",
        (60, 60),
        lambda: _small(camera(), 60),
    ),
    "ppm_plain": (
        lambda: _netpbm_plain("P3", _small(chelsea(), 60), 255),
        "PPM",
        "RGB",
        (60, 40),
        lambda: _small(chelsea(), 60),
    ),
    "ico_png": (
        lambda: encode(Image.fromarray(astronaut()), "ICO", sizes=[(64, 64)]),
        "ICO",
        "RGB",
        (64, 64),
        None,
    ),
    "ico_bmp": (
        lambda: encode(Image.fromarray(astronaut()), "ICO", sizes=[(48, 48)], bitmap_format="bmp"),
        "ICO",
        "RGBA",
        (48, 48),
        None,
    ),
    "cur": (lambda: _cur(astronaut()), "CUR", "RGB", (32, 32), None),
    "icns": (
        lambda: encode(Image.fromarray(astronaut()).resize((128, 128)), "ICNS"),
        "ICNS",
        "RGBA",
        (1024, 1024),
        None,
    ),
    "tga": (lambda: encode(chelsea(), "TGA"), "TGA", "RGB", (451, 300), chelsea),
    "tga_rle": (lambda: encode(chelsea(), "TGA", compression="tga_rle"), "TGA", "RGB", (451, 300), chelsea),
    "jpeg2000_jp2": (
        lambda: encode(coffee(), "JPEG2000", no_jp2=False),
        "JPEG2000",
        "RGB",
        (600, 400),
        coffee,
    ),
    "jpeg2000_codestream": (
        lambda: encode(coffee(), "JPEG2000", no_jp2=True),
        "JPEG2000",
        "RGB",
        (600, 400),
        coffee,
    ),
    "mpo": (lambda: _mpo(chelsea()), "MPO", "RGB", (451, 300), chelsea),
    "avif": (lambda: encode(coffee(), "AVIF", quality=90), "AVIF", "RGB", (600, 400), coffee),
    "heic": (lambda: encode(coffee(), "HEIF", quality=90), "HEIF", "RGB", (600, 400), coffee),
    "qoi": (lambda: encode(chelsea(), "QOI"), "QOI", "RGB", (451, 300), chelsea),
    "psd": (lambda: _psd(chelsea()), "PSD", "RGB", (451, 300), chelsea),
    "sgi": (lambda: encode(chelsea(), "SGI"), "SGI", "RGB", (451, 300), chelsea),
    "dds": (lambda: encode(chelsea(), "DDS"), "DDS", "RGB", (451, 300), chelsea),
    "pcx": (lambda: encode(chelsea(), "PCX"), "PCX", "RGB", (451, 300), chelsea),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_pillow_reads_is_kept(name):
    build, fmt, mode, size, source = FORMATS[name]
    if fmt == "HEIF" and "HEIF" not in Image.OPEN:
        pytest.skip("pillow-heif is not installed")
    payload = build()
    record = probe(payload)
    assert (record["format"], record["mode"], (record["width"], record["height"])) == (fmt, mode, size)
    assert record["valid"] and record["reason"] == "" and len(record["hash"]) == 16
    rgb = rgb_of(payload)
    assert rgb.shape == (size[1], size[0], 3)
    if source is not None:  # the pixels are the picture's (lossy formats within a small error)
        picture = source()
        expected = picture if picture.ndim == 3 else np.dstack([picture] * 3)
        assert np.abs(rgb.astype(int) - expected).mean() < 3
        reference = probe(encode(picture, "PNG"))
        assert imagehash.hex_to_hash(record["hash"]) - imagehash.hex_to_hash(reference["hash"]) <= 2


def test_mpo_gives_its_first_picture():
    payload = _mpo(chelsea())
    assert Image.open(io.BytesIO(payload)).n_frames == 2
    assert np.abs(rgb_of(payload).astype(int) - chelsea()).mean() < 3


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("eps", lambda: encode(chelsea(), "EPS")),  # Pillow would run Ghostscript
        ("jpeg_xl", lambda: b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64)),
        ("openexr", lambda: b"\x76\x2f\x31\x01\x02\x00\x00\x00" + bytes(64)),
    ],
)
def test_image_formats_not_read_here_are_unsupported_not_not_an_image(kind, payload):
    record = probe(payload())
    assert (record["valid"], record["reason"]) == (False, "unsupported")


@pytest.mark.parametrize("name", ["ppm_binary", "jpeg2000_jp2", "psd", "icns", "sgi"])
def test_damaged_files_of_these_formats_are_never_not_an_image(name):
    payload = FORMATS[name][0]()
    assert sniff_mime(payload).startswith("image/")
    damaged = [payload[: len(payload) // 3]]
    if name != "sgi":  # SGI's bytes 12..52 are free-form fields: damage there is harmless
        damaged.append(payload[:12] + b"\xff" * 40 + payload[52:])  # the signature intact
    for record in map(probe, damaged):
        reasons = ("truncated", "corrupt", "unsupported", "too_many_pixels")  # a size field hit
        assert not record["valid"] and record["reason"] in reasons, record
