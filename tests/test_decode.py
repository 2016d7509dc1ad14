"""Decode: one probe per image gives format, upright size, mode, validity with a reason, and a
perceptual hash; open_rgb and resized_rgb give normalised RGB pixels.

Every payload is built here from real image content (scikit-image sample photos, the
scikit-learn digits), damaged or re-encoded the way broken downloads are.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from functools import cache

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from skimage import data as samples
from sklearn.datasets import load_digits

from photoprep.images import containers
from photoprep.images.decode import (
    PROBE_FIELDS,
    REASONS,
    ImageRejected,
    decode_cost_mb,
    open_rgb,
    probe,
    probe_many,
    resized_rgb,
)
from photoprep.ingest.sniff import sniff_mime

# -- real content ------------------------------------------------------------------------


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
    return np.asarray(open_rgb(payload, max_pixels=50_000_000))


# -- the record ------------------------------------------------------------------------


def test_a_good_jpeg_gives_the_full_record():
    record = probe(astronaut_jpeg())
    assert tuple(record) == PROBE_FIELDS
    assert record == {
        "format": "JPEG",
        "width": 512,
        "height": 512,
        "mode": "RGB",
        "valid": True,
        "reason": "",
        "hash": record["hash"],
        "colour": True,
        "lossless": False,
        "quality": 90,
        "camera": False,
        "fine_hash": record["fine_hash"],
        "transform_hashes": "",
        "crop_hashes": "",
        "crop_fine_hashes": "",
    }
    assert len(record["hash"]) == 16 and int(record["hash"], 16) >= 0
    assert len(record["fine_hash"]) == 64


def test_margin_leaves_out_a_caption_band_and_crop_hashes_see_a_cropped_copy():
    from PIL import ImageDraw

    picture = Image.fromarray(astronaut())
    captioned = picture.copy()
    ImageDraw.Draw(captioned).rectangle((0, 512 - 40, 512, 512), fill="white")  # 8 % band
    cropped = picture.crop((20, 20, 492, 492))  # about 4 % off each side
    whole = [probe(encode(np.asarray(im), "PNG")) for im in (picture, captioned, cropped)]
    inner = [
        probe(encode(np.asarray(im), "PNG"), margin=0.1, crops=(0.04,))
        for im in (picture, captioned, cropped)
    ]

    def d(a: str, b: str) -> int:
        return imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b)

    assert d(whole[0]["hash"], whole[1]["hash"]) > 4  # the band moves the whole-picture hash
    assert d(inner[0]["hash"], inner[1]["hash"]) <= 2  # the margin leaves it out
    assert d(inner[0]["hash"], inner[2]["hash"]) > 4  # a crop moves the hash ...
    crop_hash, crop_fine = inner[0]["crop_hashes"], inner[0]["crop_fine_hashes"]
    assert d(crop_hash, inner[2]["hash"]) <= 2  # ... but not the original's cropped hash
    assert len(crop_hash) == 16 and len(crop_fine) == 64
    assert "," not in crop_hash and whole[0]["crop_hashes"] == ""
    with pytest.raises(ValueError, match="margin and crops"):
        probe(astronaut_jpeg(), margin=0.3, crops=(0.2,))


def test_probe_is_deterministic_and_batches_agree():
    payloads = [astronaut_jpeg(), encode(coffee(), "PNG"), b"", astronaut_jpeg()[:5000]]
    first = [probe(p) for p in payloads]
    assert [probe(p) for p in payloads] == first
    assert probe_many(payloads, "phash", 8, 50_000_000) == first


@pytest.mark.parametrize(
    ("name", "size", "hex_len"),
    [
        ("phash", 8, 16),
        ("dhash", 8, 16),
        ("ahash", 8, 16),
        ("whash", 8, 16),
        ("phash", 16, 64),
        ("whash", 16, 64),
    ],
)
def test_each_hash_kind_and_size(name, size, hex_len):
    record = probe(astronaut_jpeg(), hash_name=name, hash_size=size)
    assert record["valid"] and len(record["hash"]) == hex_len


def test_bad_hash_parameters_are_errors_not_image_reasons():
    with pytest.raises(ValueError, match="hash_name"):
        probe(astronaut_jpeg(), hash_name="md5")
    with pytest.raises(ValueError, match="power-of-two"):
        probe(astronaut_jpeg(), hash_name="whash", hash_size=12)


def test_draft_hash_stays_close_to_imagehash_on_the_full_decode():
    pictures = (astronaut(), coffee(), chelsea(), camera())
    payloads = [encode(picture, "JPEG", quality=90) for picture in pictures]
    for payload in [*payloads, big_jpeg()]:  # drafts at 1/2 (512 px) and 1/8 (2048 px)
        full = imagehash.phash(Image.open(io.BytesIO(payload)))
        ours = imagehash.hex_to_hash(probe(payload)["hash"])
        assert ours - full <= 2


def test_same_picture_as_png_and_jpeg_hashes_alike():
    for picture in (astronaut(), coffee(), chelsea()):
        from_png = imagehash.hex_to_hash(probe(encode(picture, "PNG"))["hash"])
        from_jpeg = imagehash.hex_to_hash(probe(encode(picture, "JPEG", quality=90))["hash"])
        assert from_png - from_jpeg <= 2


# -- reasons -------------------------------------------------------------------------------


def verdict(record: dict) -> dict:
    """The header and verdict fields of a probe record (a rejected record has no hashes)."""
    assert record["hash"] == record["fine_hash"] == record["transform_hashes"] == ""
    return {key: record[key] for key in ("format", "width", "height", "mode", "valid", "reason", "hash")}


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
    assert set(REASONS) == {
        "zero_bytes",
        "not_an_image",
        "truncated",
        "corrupt",
        "too_many_pixels",
        "over_budget",
        "unsupported",
    }


# -- bombs -------------------------------------------------------------------------------


def test_bomb_is_rejected_from_its_header():
    bomb = bilevel_bomb_png(20_000, 20_000)
    assert len(bomb) < 100_000
    record = probe(bomb)
    assert verdict(record) == {
        "format": "PNG",
        "width": 20_000,
        "height": 20_000,
        "mode": "1",
        "valid": False,
        "reason": "too_many_pixels",
        "hash": "",
    }
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(bomb, (64, 64))
    assert rejected.value.reason == "too_many_pixels"


def test_max_pixels_is_ours_not_pillows(monkeypatch):
    payload = encode(astronaut(), "PNG")  # 262,144 pixels
    assert probe(payload, max_pixels=262_144)["valid"]
    assert probe(payload, max_pixels=262_143)["reason"] == "too_many_pixels"
    # Pillow's own, lower limit (it raises DecompressionBombError) does not overrule ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert probe(payload)["valid"]
    assert open_rgb(payload).size == (512, 512)


def test_no_pillow_warning_escapes():
    bomb = bilevel_bomb_png(10_000, 10_000)  # over Pillow's warning size, under its error size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe(bomb)["reason"] == "too_many_pixels"
        assert probe(encode(coffee().copy(), "PNG"))["valid"]
    assert caught == []


def test_bombs_are_rejected_without_allocating_their_pixels(tmp_path):
    """Peak memory (Linux VmHWM, reset before each step) in a fresh process: the bombs'
    pixels (400 MB and 64 MB) are never allocated, while decoding a 36 MB image shows."""
    if not _peak_reset_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    (tmp_path / "huge.png").write_bytes(bilevel_bomb_png(20_000, 20_000))
    (tmp_path / "large.png").write_bytes(bilevel_bomb_png(8_000, 8_000))  # under Pillow's limits
    (tmp_path / "control.png").write_bytes(bilevel_bomb_png(6_000, 6_000))
    script = textwrap.dedent(f"""
        import json, pathlib
        from PIL import Image
        from photoprep.images.decode import probe, resized_rgb, ImageRejected
        folder = pathlib.Path({str(tmp_path)!r})

        def rss_mb(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) / 1024

        def peak_growth(step):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            start = rss_mb("VmRSS")
            result = step()
            return rss_mb("VmHWM") - start, result

        def rejections(payload):
            reasons = [probe(payload)["reason"]]
            try:
                resized_rgb(payload, (64, 64))
            except ImageRejected as e:
                reasons.append(e.reason)
            return reasons

        probe((folder / "control.png").read_bytes()[:100])  # warm every import
        out = {{}}
        for name in ("huge", "large"):
            payload = (folder / f"{{name}}.png").read_bytes()
            out[name] = peak_growth(lambda: rejections(payload))
        out["control"] = peak_growth(lambda: Image.open(folder / "control.png").load() and None)
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout)
    for name in ("huge", "large"):
        growth, reasons = figures[name]
        assert reasons == ["too_many_pixels", "too_many_pixels"]
        assert growth < 5, figures
    assert figures["control"][0] > 30, figures


def _peak_reset_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return "VmHWM" in f.read()
    except OSError:
        return False


# -- unusual but valid images ---------------------------------------------------------------


def _palette_with_transparency() -> tuple[bytes, np.ndarray]:
    im = Image.fromarray(chelsea()).quantize(64)
    pal = np.asarray(im).copy()
    pal[:40, :] = 63  # top band in the transparent palette entry
    im = Image.fromarray(pal, "P")
    im.putpalette(Image.fromarray(chelsea()).quantize(64).getpalette())
    return encode(im, "PNG", transparency=63), pal == 63


@cache
def transparent_logo() -> np.ndarray:
    """The scikit-image logo (500 x 500) cut out: its white background fully transparent with
    black left under it, as encoders often leave, and the bottom 50 rows half transparent."""
    logo = samples.logo().copy()
    clear = (logo[..., :3] > 240).all(axis=2)
    logo[clear] = 0
    logo[450:, :, 3] = np.where(clear[450:], 0, 128)
    return logo


def _rgba(fmt: str = "PNG") -> tuple[bytes, np.ndarray]:
    logo = transparent_logo()
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encode(logo, fmt, **options), logo[..., 3] == 0


def _animated_gif() -> bytes:
    frames = [Image.fromarray(digit(i)).convert("P") for i in (0, 1, 2)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(camera().astype(np.uint16) * 257), "PNG")


UNUSUAL = {
    # name: (payload builder, format, mode as stored, (width, height))
    "cmyk_jpeg": (
        lambda: encode(Image.fromarray(astronaut()).convert("CMYK"), "JPEG", quality=95),
        "JPEG",
        "CMYK",
        (512, 512),
    ),
    "16bit_png": (_sixteen_bit_png, "PNG", "I;16", (512, 512)),
    "palette_transparency_png": (lambda: _palette_with_transparency()[0], "PNG", "P", (451, 300)),
    "rgba_png": (lambda: _rgba()[0], "PNG", "RGBA", (500, 500)),
    "grey_png": (lambda: encode(camera(), "PNG"), "PNG", "L", (512, 512)),
    "grey_alpha_png": (
        lambda: encode(Image.fromarray(np.dstack([camera(), camera()]), "LA"), "PNG"),
        "PNG",
        "LA",
        (512, 512),
    ),
    "bilevel_png": (lambda: encode(Image.fromarray(digit(5) > 100), "PNG"), "PNG", "1", (64, 64)),
    "rgb_coded_jpeg": (  # stored as RGB, not YCbCr (Adobe transform 0)
        lambda: encode(coffee(), "JPEG", quality=90, keep_rgb=True),
        "JPEG",
        "RGB",
        (600, 400),
    ),
    "grey_jpeg": (lambda: encode(camera(), "JPEG"), "JPEG", "L", (512, 512)),
    "progressive_jpeg": (lambda: encode(coffee(), "JPEG", progressive=True), "JPEG", "RGB", (600, 400)),
    "webp": (lambda: encode(coffee(), "WEBP", quality=80), "WEBP", "RGB", (600, 400)),
    "webp_lossless_alpha": (lambda: _rgba("WEBP")[0], "WEBP", "RGBA", (500, 500)),
    "bmp": (lambda: encode(chelsea(), "BMP"), "BMP", "RGB", (451, 300)),
    "tiff": (lambda: encode(chelsea(), "TIFF", compression="tiff_lzw"), "TIFF", "RGB", (451, 300)),
    "gif_animated": (_animated_gif, "GIF", "P", (64, 64)),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_valid_images_are_kept_and_normalised_to_rgb(name):
    build, fmt, mode, size = UNUSUAL[name]
    payload = build()
    record = probe(payload)
    assert (record["format"], record["mode"], (record["width"], record["height"])) == (fmt, mode, size)
    assert record["valid"] and record["reason"] == "" and len(record["hash"]) == 16
    im = open_rgb(payload)
    assert (im.mode, im.size) == ("RGB", size)
    pixels = resized_rgb(payload, (48, 40), "pad")
    assert pixels.shape == (48, 40, 3) and pixels.dtype == np.uint8


def test_cmyk_jpeg_converts_to_the_right_colours():
    rgb = rgb_of(UNUSUAL["cmyk_jpeg"][0]()).astype(int)
    assert np.abs(rgb - astronaut()).mean() < 6


def test_16_bit_grey_is_scaled_not_clipped():
    assert np.array_equal(rgb_of(_sixteen_bit_png())[..., 0], camera())


def test_transparency_is_composited_on_white():
    for payload, clear in (_palette_with_transparency(), _rgba("PNG"), _rgba("WEBP")):
        assert clear.mean() > 0.1
        rgb = rgb_of(payload)
        assert (rgb[clear] == 255).all()
        assert (rgb[~clear] < 250).any()


def test_half_transparent_pixels_are_blended_with_white():
    logo = transparent_logo()
    rgb = rgb_of(_rgba("PNG")[0]).astype(int)
    half = logo[450:, :, 3] == 128
    expected = (logo[450:, :, :3].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(rgb[450:][half] - expected[half]).max() <= 1


def test_gif_gives_its_first_frame():
    payload = _animated_gif()
    assert Image.open(io.BytesIO(payload)).n_frames == 3
    rgb = rgb_of(payload)
    first, second = digit(0).astype(int), digit(1).astype(int)
    assert np.abs(rgb[..., 0] - first).max() <= 8
    assert np.abs(rgb[..., 0] - second).max() > 100


# -- EXIF orientation ---------------------------------------------------------------------


def test_orientation_6_on_100x50_gives_width_50_height_100():
    stored = np.asarray(Image.fromarray(chelsea()).resize((100, 50)))
    payload = with_orientation(stored, 6)
    record = probe(payload)
    assert (record["width"], record["height"], record["valid"]) == (50, 100, True)
    upright = rgb_of(payload)
    plain = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    assert np.array_equal(upright, np.rot90(plain, k=-1))  # 6: turn 90 degrees clockwise
    assert resized_rgb(payload, (100, 50)).shape == (100, 50, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(orientation, fmt):
    stored = np.asarray(Image.fromarray(coffee()).resize((120, 80)))
    payload = with_orientation(stored, orientation, fmt)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).convert("RGB")
    assert np.array_equal(rgb_of(payload), np.asarray(expected))
    record = probe(payload)
    assert (record["width"], record["height"]) == expected.size


def test_orientation_is_applied_before_hashing():
    stored = chelsea()
    rotated_by_tag = probe(with_orientation(stored, 8, "PNG"))
    rotated_pixels = probe(encode(np.rot90(stored, k=1), "PNG"))  # 8: 90 degrees anticlockwise
    assert (rotated_by_tag["width"], rotated_by_tag["height"]) == (300, 451)
    assert rotated_by_tag["hash"] == rotated_pixels["hash"]


def test_jpeg_draft_respects_orientation():
    stored = np.tile(astronaut(), (2, 4, 1))  # 2048 wide, 1024 high, shown upright as 1024 x 2048
    payload = with_orientation(stored, 6)
    im = open_rgb(payload, 50_000_000, draft_size=(100, 300))
    assert im.size == (256, 512)  # 1/4 scale: the largest keeping >= 100 wide and >= 300 high
    assert open_rgb(payload, 50_000_000).size == (1024, 2048)


# -- resized_rgb ---------------------------------------------------------------------------


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (120, 30)])
def test_resized_shapes(fit, size):
    for payload in (astronaut_jpeg(), encode(coffee(), "PNG")):
        pixels = resized_rgb(payload, size, fit)
        assert pixels.shape == (*size, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable


def test_stretch_is_a_plain_resize():
    payload = encode(coffee(), "PNG")
    expected = np.asarray(Image.fromarray(coffee()).resize((80, 48), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(resized_rgb(payload, (48, 80), "stretch") - expected).max() <= 2


def test_pad_keeps_aspect_with_black_bars():
    wide = resized_rgb(encode(coffee(), "PNG"), (64, 64), "pad")  # 600 x 400 -> 64 x 43
    assert (wide[:10] == 0).all() and (wide[-11:] == 0).all()
    assert (wide[10:53].reshape(-1, 3).max(axis=1) > 0).mean() > 0.99
    tall = resized_rgb(encode(np.rot90(coffee()).copy(), "PNG"), (64, 64), "pad")  # 400 x 600 -> 43 x 64
    assert (tall[:, :10] == 0).all() and (tall[:, -11:] == 0).all()
    assert (tall[:, 10:53].reshape(-1, 3).max(axis=1) > 0).mean() > 0.99
    expected = np.asarray(Image.fromarray(coffee()).resize((64, 43), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(wide[10:53].astype(int) - expected).mean() < 1


def test_crop_takes_the_centre():
    picture = coffee()  # 600 x 400 -> the centre 400 x 400 square
    pixels = resized_rgb(encode(picture, "PNG"), (64, 64), "crop").astype(int)

    def square(left: int) -> np.ndarray:
        region = Image.fromarray(picture).crop((left, 0, left + 400, 400))
        return np.asarray(region.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)

    errors = {left: np.abs(pixels - square(left)).mean() for left in (0, 50, 100, 150, 200)}
    assert errors[100] < 1 and min(errors, key=errors.get) == 100


def test_jpeg_is_resized_from_a_draft_close_to_the_full_decode():
    payload = big_jpeg()
    full = Image.open(io.BytesIO(payload)).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    assert np.abs(resized_rgb(payload, (64, 64)).astype(int) - np.asarray(full)).mean() < 3


def test_open_rgb_draft_is_never_below_the_asked_size():
    payload = big_jpeg()  # 2048 x 2048
    assert open_rgb(payload, 50_000_000, draft_size=(64, 64)).size == (256, 256)
    assert open_rgb(payload, 50_000_000, draft_size=(300, 300)).size == (512, 512)
    assert open_rgb(payload, 50_000_000, draft_size=(1500, 10)).size == (2048, 2048)


def test_resize_arguments_are_checked():
    with pytest.raises(ValueError, match="fit"):
        resized_rgb(astronaut_jpeg(), (64, 64), "zoom")


# -- no globals ----------------------------------------------------------------------------


def test_truncated_images_must_not_be_loaded_silently(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        probe(astronaut_jpeg())


def test_probe_leaves_pillow_settings_alone():
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    probe(bilevel_bomb_png(10_000, 10_000))
    probe(astronaut_jpeg()[:1000])
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


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


def test_quality_lossless_camera_and_colour_are_read_from_the_file():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Nikon", "D90"
    camera_jpeg = probe(encode(coffee(), "JPEG", quality=93, exif=exif.tobytes()))
    assert (camera_jpeg["quality"], camera_jpeg["lossless"], camera_jpeg["camera"]) == (93, False, True)
    assert camera_jpeg["colour"]
    for quality in (40, 70, 85, 95, 100):
        assert probe(encode(coffee(), "JPEG", quality=quality))["quality"] == quality
    png = probe(encode(coffee(), "PNG"))
    assert (png["quality"], png["lossless"], png["camera"], png["colour"]) == (0, True, False, True)
    grey_as_rgb = np.dstack([camera()] * 3)
    for payload in (
        encode(grey_as_rgb, "JPEG", quality=90),
        encode(grey_as_rgb, "PNG"),
        encode(camera(), "PNG"),
    ):
        assert not probe(payload)["colour"]
    assert probe(encode(coffee(), "WEBP", lossless=True))["lossless"]
    assert not probe(encode(coffee(), "WEBP", quality=80))["lossless"]
    assert not probe(encode(coffee(), "TIFF", compression="jpeg"))["lossless"]
    assert probe(encode(coffee(), "TIFF", compression="tiff_lzw"))["lossless"]


def test_transform_hashes_are_the_hashes_of_the_transformed_picture():
    record = probe(encode(chelsea(), "PNG"), transforms=("hflip", "rot90", "rot180", "rot270"))
    turns = {
        "hflip": chelsea()[:, ::-1],
        "rot90": np.rot90(chelsea(), 1),
        "rot180": np.rot90(chelsea(), 2),
        "rot270": np.rot90(chelsea(), 3),
    }
    hashes = record["transform_hashes"].split(",")
    assert len(hashes) == 4
    for value, picture in zip(hashes, turns.values(), strict=True):
        assert value == probe(encode(np.ascontiguousarray(picture), "PNG"))["hash"]
    with pytest.raises(ValueError, match="transforms"):
        probe(encode(chelsea(), "PNG"), transforms=("shear",))


# -- containers and the decode budget: decided from headers, before any allocation -----------


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


def test_embedded_sizes_come_from_every_image_of_a_container():
    icns = encode(Image.fromarray(astronaut()).resize((128, 128)), "ICNS")
    assert {(128, 128), (1024, 1024)} <= set(containers.embedded_sizes(icns))
    ico = ico_around(bilevel_bomb_png(9000, 9000))
    assert containers.embedded_sizes(ico) == [(16, 16), (9000, 9000)]
    frames = [Image.fromarray(digit(i)).convert("P") for i in (0, 1, 2)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    sizes = containers.embedded_sizes(gif)  # the screen, then each frame's extent
    assert sizes[0] == (64, 64) and len(sizes) == 4 and max(sizes) == (64, 64)
    webp = encode(
        Image.fromarray(chelsea()),
        "WEBP",
        save_all=True,
        append_images=[Image.fromarray(coffee()[:300, :451])],
    )
    assert (451, 300) in containers.embedded_sizes(webp)
    tiff = encode(
        Image.fromarray(chelsea()), "TIFF", save_all=True, append_images=[Image.fromarray(coffee())]
    )
    assert containers.page_sizes(Image.open(io.BytesIO(tiff))) == [(451, 300), (600, 400)]


def test_ico_whose_header_lies_is_refused_from_its_embedded_header():
    record = probe(ico_around(bilevel_bomb_png(9000, 9000)))
    assert (record["format"], record["valid"], record["reason"]) == ("ICO", False, "too_many_pixels")
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(ico_around(bilevel_bomb_png(9000, 9000)), (64, 64))
    assert rejected.value.reason == "too_many_pixels"


def _patched_gif_frame(width: int, height: int) -> bytes:
    """A real animated GIF whose second frame's descriptor claims width x height."""
    frames = [Image.fromarray(digit(i)).convert("P") for i in (0, 1)]
    gif = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100))
    second = gif.rindex(b"\x21\xf9\x04") + 8  # the descriptor after the last frame's control block
    assert gif[second] == 0x2C
    gif[second + 5 : second + 9] = struct.pack("<HH", width, height)
    return bytes(gif)


def test_later_frames_and_pages_count_against_max_pixels():
    assert probe(_patched_gif_frame(4000, 4000), max_pixels=10_000_000)["reason"] == "too_many_pixels"
    tiff = encode(
        Image.fromarray(digit(1)), "TIFF", save_all=True, append_images=[Image.fromarray(chelsea())]
    )
    assert probe(tiff, max_pixels=100_000)["reason"] == "too_many_pixels"
    assert probe(tiff, max_pixels=200_000)["valid"]
    apng = bytearray(
        encode(Image.fromarray(digit(1)), "PNG", save_all=True, append_images=[Image.fromarray(digit(2))])
    )
    second = apng.rindex(b"fcTL")
    apng[second + 8 : second + 16] = struct.pack(">II", 5000, 5000)
    assert probe(bytes(apng), max_pixels=10_000_000)["reason"] == "too_many_pixels"


def test_decode_budget_refuses_a_16_bit_png_just_under_max_pixels():
    payload = sixteen_bit_grey_png(7000, 7000)  # 49 MP: under max_pixels (50 MP)
    estimate = decode_cost_mb("I;16B", (7000, 7000), gray=True)
    assert 100 < estimate < 200
    record = probe(payload, max_pixels=50_000_000, max_decode_mb=100)
    assert (record["format"], record["width"], record["valid"], record["reason"]) == (
        "PNG",
        7000,
        False,
        "over_budget",
    )
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(payload, (64, 64), max_decode_mb=100)
    assert rejected.value.reason == "over_budget"
    small = encode(Image.fromarray(camera().astype(np.uint16) * 257), "PNG")
    assert probe(small, max_decode_mb=100)["valid"]


def test_refusals_allocate_nothing_and_the_budget_bounds_a_decode(tmp_path):
    """Peak memory (Linux VmHWM, reset before each step) in a fresh process: the ICO that says
    16x16 around a 9000x9000 PNG, and the 7000x7000 16-bit PNG refused by the budget,
    allocate nothing; the same PNG decoded within a budget stays within its estimate."""
    if not _peak_reset_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    (tmp_path / "ico").write_bytes(ico_around(bilevel_bomb_png(9000, 9000)))
    (tmp_path / "png16").write_bytes(sixteen_bit_grey_png(7000, 7000))
    script = textwrap.dedent(f"""
        import json, pathlib, time
        from photoprep.images.decode import probe
        folder = pathlib.Path({str(tmp_path)!r})

        def rss_mb(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) / 1024

        def peak_growth(step):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            start, began = rss_mb("VmRSS"), time.perf_counter()
            result = step()
            return rss_mb("VmHWM") - start, time.perf_counter() - began, result

        ico, png16 = (folder / "ico").read_bytes(), (folder / "png16").read_bytes()
        probe(ico[:100])  # warm every import
        out = {{
            "ico": peak_growth(lambda: probe(ico)["reason"]),
            "ico_budget": peak_growth(lambda: probe(ico, max_pixels=10**9, max_decode_mb=256)["reason"]),
            "png16_refused": peak_growth(lambda: probe(png16, max_decode_mb=100)["reason"]),
            "png16_decoded": peak_growth(lambda: probe(png16, max_decode_mb=256)["reason"]),
        }}
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout)
    assert figures["ico"][2] == "too_many_pixels" and figures["ico"][0] < 5, figures
    assert figures["ico_budget"][2] == "over_budget" and figures["ico_budget"][0] < 5, figures
    assert figures["png16_refused"][2] == "over_budget" and figures["png16_refused"][0] < 5, figures
    growth, _seconds, reason = figures["png16_decoded"]
    assert reason == "" and growth < decode_cost_mb("I;16B", (7000, 7000), gray=True) * 1.1, figures


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
