"""The guarded decode (`photoprep.images.decode`): bombs refused from their headers without allocating
their pixels, unusual but valid images normalised to upright RGB, and the decode budget.

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
import threading
import time
import warnings
from functools import cache

import numpy as np
import pytest
from pictures import (
    astronaut,
    astronaut_jpeg,
    big_jpeg,
    bilevel_bomb_png,
    camera,
    chelsea,
    coffee,
    digit,
    encode,
    ico_around,
    peak_reset_works,
    rgb_of,
    sixteen_bit_grey_png,
    verdict,
    with_orientation,
)
from PIL import Image, ImageFile, ImageOps
from skimage import data as samples

from photoprep.images import containers
from photoprep.images.decode import DecodeLimits, decode_cost_mb, open_rgb
from photoprep.images.formats import ImageRejected
from photoprep.images.probe import ProbeSpec, probe
from photoprep.images.resize import resized_rgb

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
    assert probe(payload, ProbeSpec(limits=DecodeLimits(262_144)))["valid"]
    assert probe(payload, ProbeSpec(limits=DecodeLimits(262_143)))["reason"] == "too_many_pixels"
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
    if not peak_reset_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    (tmp_path / "huge.png").write_bytes(bilevel_bomb_png(20_000, 20_000))
    (tmp_path / "large.png").write_bytes(bilevel_bomb_png(8_000, 8_000))  # under Pillow's limits
    (tmp_path / "control.png").write_bytes(bilevel_bomb_png(6_000, 6_000))
    script = textwrap.dedent(f"""
        import json, pathlib
        from PIL import Image
        from photoprep.images.formats import ImageRejected
        from photoprep.images.probe import probe
        from photoprep.images.resize import resized_rgb
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


def test_jpeg_draft_respects_orientation():
    stored = np.tile(astronaut(), (2, 4, 1))  # 2048 wide, 1024 high, shown upright as 1024 x 2048
    payload = with_orientation(stored, 6)
    im = open_rgb(payload, draft_size=(100, 300))
    assert im.size == (256, 512)  # 1/4 scale: the largest keeping >= 100 wide and >= 300 high
    assert open_rgb(payload).size == (1024, 2048)


def test_open_rgb_draft_is_never_below_the_asked_size():
    payload = big_jpeg()  # 2048 x 2048
    assert open_rgb(payload, draft_size=(64, 64)).size == (256, 256)
    assert open_rgb(payload, draft_size=(300, 300)).size == (512, 512)
    assert open_rgb(payload, draft_size=(1500, 10)).size == (2048, 2048)


# -- no globals ----------------------------------------------------------------------------


def test_truncated_images_must_not_be_loaded_silently(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        probe(astronaut_jpeg())


# -- containers and the decode budget: decided from headers, before any allocation -----------


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
    ten_megapixels = ProbeSpec(limits=DecodeLimits(10_000_000))
    assert probe(_patched_gif_frame(4000, 4000), ten_megapixels)["reason"] == "too_many_pixels"
    tiff = encode(
        Image.fromarray(digit(1)), "TIFF", save_all=True, append_images=[Image.fromarray(chelsea())]
    )
    assert probe(tiff, ProbeSpec(limits=DecodeLimits(100_000)))["reason"] == "too_many_pixels"
    assert probe(tiff, ProbeSpec(limits=DecodeLimits(200_000)))["valid"]
    apng = bytearray(
        encode(Image.fromarray(digit(1)), "PNG", save_all=True, append_images=[Image.fromarray(digit(2))])
    )
    second = apng.rindex(b"fcTL")
    apng[second + 8 : second + 16] = struct.pack(">II", 5000, 5000)
    assert probe(bytes(apng), ProbeSpec(limits=DecodeLimits(10_000_000)))["reason"] == "too_many_pixels"


def test_decode_budget_refuses_a_16_bit_png_just_under_max_pixels():
    payload = sixteen_bit_grey_png(7000, 7000)  # 49 MP: under max_pixels (50 MP)
    estimate = decode_cost_mb("I;16B", (7000, 7000), gray=True)
    assert 100 < estimate < 200
    record = probe(payload, ProbeSpec(limits=DecodeLimits(50_000_000, 100)))
    assert (record["format"], record["width"], record["valid"], record["reason"]) == (
        "PNG",
        7000,
        False,
        "over_budget",
    )
    with pytest.raises(ImageRejected) as rejected:
        resized_rgb(payload, (64, 64), limits=DecodeLimits(max_decode_mb=100))
    assert rejected.value.reason == "over_budget"
    small = encode(Image.fromarray(camera().astype(np.uint16) * 257), "PNG")
    assert probe(small, ProbeSpec(limits=DecodeLimits(max_decode_mb=100)))["valid"]


def test_refusals_allocate_nothing_and_the_budget_bounds_a_decode(tmp_path):
    """Peak memory (Linux VmHWM, reset before each step) in a fresh process: the ICO that says
    16x16 around a 9000x9000 PNG, and the 7000x7000 16-bit PNG refused by the budget,
    allocate nothing; the same PNG decoded within a budget stays within its estimate."""
    if not peak_reset_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    (tmp_path / "ico").write_bytes(ico_around(bilevel_bomb_png(9000, 9000)))
    (tmp_path / "png16").write_bytes(sixteen_bit_grey_png(7000, 7000))
    script = textwrap.dedent(f"""
        import json, pathlib, time
        from photoprep.images.decode import DecodeLimits
        from photoprep.images.probe import ProbeSpec, probe
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
        wide = ProbeSpec(limits=DecodeLimits(10**9, 256))
        mb100, mb256 = (ProbeSpec(limits=DecodeLimits(max_decode_mb=mb)) for mb in (100, 256))
        probe(ico[:100])  # warm every import
        out = {{
            "ico": peak_growth(lambda: probe(ico)["reason"]),
            "ico_budget": peak_growth(lambda: probe(ico, wide)["reason"]),
            "png16_refused": peak_growth(lambda: probe(png16, mb100)["reason"]),
            "png16_decoded": peak_growth(lambda: probe(png16, mb256)["reason"]),
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


def test_threads_decoding_at_once_share_one_quiet_scope_and_leave_the_filters_as_they_were():
    """The bucket stage resizes in threads: each must decode with Pillow's warnings silenced, and
    the filters after must be the ones before (a scope a thread would put back another's)."""
    from photoprep.images.decode import pillow_quiet

    before = list(warnings.filters)
    start, loud = threading.Barrier(4), []

    def decode_many() -> None:
        start.wait()
        for _ in range(100):
            with pillow_quiet():
                time.sleep(0.0005)  # another thread enters and leaves meanwhile
                if warnings.filters[0][0] != "ignore":
                    loud.append(1)

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not loud
    assert warnings.filters == before
