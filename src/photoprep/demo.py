"""The embedded demo source: scikit-learn's digits rendered as photos, with the real defects.

`render_demo(out_dir)` writes `photos.txt`, `labels.csv`, `expected.json` and one file per id
in `cdn/` (file name = id, no extension, like a CDN path). Everything is deterministic: two
renders are byte-identical.

Plain upscaled 8x8 digits collide under perceptual hashing, so each digit is drawn on its
own smooth colour background (a gradient and a soft blob) at a small random offset, and a
rendering whose hash comes within `MIN_DISTANCE` bits of one already drawn is drawn again
with the next random background. The hash checked is the pipeline's own (`probe.probe`).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits

from photoprep.core.layout import PATHS, Layout
from photoprep.images import hamming, probe
from photoprep.images.resize import PixelSpec, resized_rgb

NAMESPACE = uuid.UUID("5a36f382-dbdf-11e6-95fd-d746d863c3eb")
MIN_DISTANCE = 12  # phash bits between any two distinct images (checked on render)
NEAR_MAX = 3  # an injected near duplicate stays within this many bits
N_EXACT = 30
N_NEAR = 20
N_TRUNCATED = 6
N_ZERO = 3
N_TOO_SMALL = 2
N_MISSING = 2

HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    "<body><h1>502 Bad Gateway</h1><p>The photo service is unavailable (request {n}).</p></body></html>\n"
)
JSON_ERROR = '{"error": "rate limited", "status": 429, "retry_after": 30}\n'
SOURCE_YAML = """\
# The embedded demo: scikit-learn's digits rendered as photos, with the real collection's defects.
# Regenerate (byte for byte) with: photoprep demo pipeline/sources/demo
format: heobs
manifest: photos.txt
url: "cdn/{id}"        # a path relative to this folder; goes through the same fetcher as https:// URLs
labels: labels.csv
"""


def demo_id(kind: str, index: int) -> str:
    """A stable UUID for the index-th image of a kind."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}-{index}"))


def size_of(index: int, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): a third 64x64, a third 96x96, a third 200 wide and 120..165 high."""
    kind = index % 3
    if kind == 0:
        return 64, 64
    if kind == 1:
        return 96, 96
    return 120 + 5 * int(rng.integers(0, 10)), 200


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field: a gradient between two random colours plus a soft blob."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x / w + np.sin(angle) * y / h
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 + (c1 - c0) * t[..., None]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    radius = rng.uniform(0.2, 0.6) * max(h, w)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
    img += rng.uniform(-120, 120, 3) * blob[..., None]
    return np.clip(img, 0, 255)


def draw_digit(digit: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One digit (8x8, 0..16) drawn smoothly on a background, slightly off centre."""
    img = _background(h, w, rng)
    side = int(min(h, w) * rng.uniform(0.62, 0.78))
    glyph = Image.fromarray((digit / 16 * 255).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    alpha = np.asarray(glyph, np.float32)[..., None] / 255
    slack_y, slack_x = h - side, w - side
    top = int(np.clip(slack_y / 2 + rng.uniform(-0.3, 0.3) * slack_y, 0, slack_y))
    left = int(np.clip(slack_x / 2 + rng.uniform(-0.3, 0.3) * slack_x, 0, slack_x))
    patch = img[top : top + side, left : left + side]
    luma = float(patch.mean())
    ink = rng.uniform(0, 60, 3) if luma > 128 else rng.uniform(195, 255, 3)
    img[top : top + side, left : left + side] = patch * (1 - alpha) + ink * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "PNG":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _hash(data: bytes) -> np.ndarray:
    return hamming.pack_hashes([probe.probe(data)["hash"]])[0]


class _Spread:
    """The packed hashes drawn so far, to keep every new one far from all of them."""

    def __init__(self) -> None:
        self.hashes = np.zeros((0, 8), np.uint8)

    def distance_to_all(self, packed: np.ndarray) -> np.ndarray:
        return np.unpackbits(np.bitwise_xor(self.hashes, packed), axis=1).sum(axis=1)

    def far_enough(self, packed: np.ndarray) -> bool:
        return not len(self.hashes) or int(self.distance_to_all(packed).min()) >= MIN_DISTANCE

    def add(self, packed: np.ndarray) -> None:
        self.hashes = np.vstack([self.hashes, packed])


def _render_distinct(
    digit: np.ndarray, h: int, w: int, fmt: str, rng: np.random.Generator, spread: _Spread
) -> tuple[np.ndarray, bytes]:
    for _ in range(200):
        pixels = draw_digit(digit, h, w, rng)
        data = _encode(pixels, fmt)
        packed = _hash(data)
        if spread.far_enough(packed):
            spread.add(packed)
            return pixels, data
    raise RuntimeError("could not draw a rendering far enough from the others")


def _near_copy(pixels: np.ndarray, original: bytes, variant: int) -> bytes:
    """A re-encoded (even variants) or slightly resized (odd variants) copy."""
    if variant % 2 == 0:
        return _encode(pixels, "JPEG", quality=70)
    h, w = pixels.shape[:2]
    smaller = Image.fromarray(pixels).resize(
        (w - max(2, w // 48), h - max(2, h // 48)), Image.Resampling.LANCZOS
    )
    return _encode(np.asarray(smaller), "JPEG", quality=88)


@dataclass
class _Demo:
    """The files, labels and titles rendered so far, and what was injected (for expected.json)."""

    files: dict[str, bytes] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    titles: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, Any] = field(
        default_factory=lambda: {"exact": {}, "near": {}, "broken": {}, "missing": []}
    )
    near_distances: list[int] = field(default_factory=list)

    def add(self, rid: str, data: bytes, label: str, title: int) -> None:
        self.files[rid], self.labels[rid], self.titles[rid] = data, label, title


def render_demo(out_dir: Path, seed: int = 0, limit: int | None = None) -> dict:
    """Render the demo source into `out_dir` (replacing its cdn/); return the injected counts."""
    out_dir = Path(out_dir)
    digits = load_digits()
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    rng = np.random.default_rng(seed)
    spread = _Spread()
    demo = _Demo()
    pixels_of = _render_digits(demo, digits, n, rng, spread)
    originals = [k for k in demo.files if not demo.files[k].startswith(b"\x89PNG")]
    order = rng.permutation(len(originals))
    _add_copies(
        demo, [originals[j] for j in order[:N_EXACT]], [originals[j] for j in order[N_EXACT:]], pixels_of
    )
    _add_broken(demo, digits, [originals[int(order[-1 - k])] for k in range(N_TRUNCATED)], rng, spread)
    lines = _manifest_lines(demo.titles, demo.labels, rng)
    _write(out_dir, demo.files, demo.labels, lines)
    broken_counts: dict[str, int] = {}
    for reason in demo.kinds["broken"].values():
        broken_counts[reason] = broken_counts.get(reason, 0) + 1
    expected = {
        "digits": n,
        "lines": len(lines),
        "malformed_lines": 2,
        "unique_ids": len(demo.titles),
        "missing": N_MISSING,
        "fetched": len(demo.files),
        "exact_duplicates": len(demo.kinds["exact"]),
        "near_duplicates": len(demo.kinds["near"]),
        "broken": dict(sorted(broken_counts.items())),
        "valid_unique_images": n,
        "min_distinct_phash_distance": _min_distance(spread.hashes),
        "max_near_phash_distance": max(demo.near_distances, default=0),
        "ids": demo.kinds,
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return {k: v for k, v in expected.items() if k != "ids"}


def _render_digits(
    demo: _Demo, digits: Any, n: int, rng: np.random.Generator, spread: _Spread
) -> dict[str, np.ndarray]:
    """The first `n` digits, each drawn far from all before it; their pixels by id."""
    pixels_of: dict[str, np.ndarray] = {}
    for i in range(n):
        h, w = size_of(i, rng)
        fmt = "PNG" if i % 9 == 0 else "JPEG"
        pixels, data = _render_distinct(digits.images[i], h, w, fmt, rng, spread)
        rid = demo_id("digit", i)
        demo.add(rid, data, str(digits.target[i]), i)
        pixels_of[rid] = pixels
    return pixels_of


def _add_copies(
    demo: _Demo, exact_of: list[str], near_pool: list[str], pixels_of: dict[str, np.ndarray]
) -> None:
    """Byte-identical copies of `exact_of` under new ids, then near copies of the first originals
    of `near_pool` whose hash stays within `NEAR_MAX` bits."""
    for k, original in enumerate(exact_of):
        rid = demo_id("copy", k)
        demo.add(rid, demo.files[original], demo.labels[original], demo.titles[original])
        demo.kinds["exact"][rid] = original
    for original in near_pool:
        if len(demo.kinds["near"]) == N_NEAR:
            break
        k = len(demo.kinds["near"])
        data = _near_copy(pixels_of[original], demo.files[original], k)
        distance = int(np.unpackbits(np.bitwise_xor(_hash(data), _hash(demo.files[original]))).sum())
        if distance > NEAR_MAX:
            continue
        rid = demo_id("near", k)
        demo.add(rid, data, demo.labels[original], demo.titles[original])
        demo.kinds["near"][rid] = original
        demo.near_distances.append(distance)


def _add_broken(
    demo: _Demo, digits: Any, truncated_of: list[str], rng: np.random.Generator, spread: _Spread
) -> None:
    """Truncated JPEGs of `truncated_of`'s digits, empty and non-image payloads, too-small
    images, and ids with no file."""
    for k, source in enumerate(truncated_of):
        rid = demo_id("truncated", k)
        full = _encode(draw_digit(digits.images[demo.titles[source]], 96, 96, rng), "JPEG")
        demo.add(rid, full[: int(len(full) * 0.6)], demo.labels[source], demo.titles[source])
        demo.kinds["broken"][rid] = "truncated"
    broken_payloads = (
        [("zero", b"", "zero_bytes")] * N_ZERO
        + [("html", HTML_PAGE.format(n=k).encode(), "not_an_image") for k in range(3)]
        + [("json", JSON_ERROR.encode(), "not_an_image")]
    )
    for k, (kind, data, reason) in enumerate(broken_payloads):
        rid = demo_id(kind, k)
        demo.add(rid, data, str(digits.target[k]), k)
        demo.kinds["broken"][rid] = reason
    for k in range(N_TOO_SMALL):
        rid = demo_id("small", k)
        _, data = _render_distinct(digits.images[k], 16, 16, "PNG", rng, spread)
        demo.add(rid, data, str(digits.target[k]), k)
        demo.kinds["broken"][rid] = "too_small"
    for k in range(N_MISSING):
        rid = demo_id("missing", k)
        demo.titles[rid] = k
        demo.kinds["missing"].append(rid)


def _min_distance(packed: np.ndarray) -> int:
    best = 64
    for i in range(len(packed) - 1):
        d = np.unpackbits(np.bitwise_xor(packed[i + 1 :], packed[i]), axis=1).sum(axis=1)
        best = min(best, int(d.min()))
    return best


def _manifest_lines(titles: dict[str, int], labels: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Two lines per id (vie, fra), shuffled, plus two malformed lines."""
    lines = []
    for rid, number in titles.items():
        digit = labels.get(rid, "?")
        lines.append(f"{rid} | Chữ số {digit} ({number}) | vie")
        lines.append(f"{rid} | Chiffre {digit} — n° {number} | fra")
    lines = [lines[j] for j in rng.permutation(len(lines))]
    lines.insert(len(lines) // 3, "d2b7c9f0-0000-4000-8000-000000000000 | Ảnh không có ngôn ngữ")
    lines.insert(2 * len(lines) // 3, " | Ảnh không có mã | vie")
    return lines


def _write(out_dir: Path, files: dict[str, bytes], labels: dict[str, str], lines: list[str]) -> None:
    cdn = out_dir / "cdn"
    if cdn.exists():
        shutil.rmtree(cdn)
    cdn.mkdir(parents=True)
    for rid, data in files.items():
        (cdn / rid).write_bytes(data)
    text = "\ufeff" + "\r\n".join(lines[:10]) + "\r\n\r\n" + "\n".join(lines[10:]) + "\n\n"
    (out_dir / "photos.txt").write_bytes(text.encode("utf-8"))
    rows = ["id,label"] + [f"{rid},{labels[rid]}" for rid in sorted(labels)]
    (out_dir / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out_dir / "source.yaml").write_text(SOURCE_YAML, encoding="utf-8")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PATHS.source_dir("demo")
    print(json.dumps(render_demo(out), indent=2))


if __name__ == "__main__":
    main()


def drawings(ids: list[str], seed: int, pixels: PixelSpec, source_dir: Path | None = None) -> np.ndarray:
    """The digits behind ``ids`` (ids of the embedded demo; a kept copy stands for its original)
    as rendering ``seed`` draws them, resized as the bucket stage resizes (``pixels``)."""
    import tempfile

    source_dir = source_dir or PATHS.source_dir("demo")
    kinds = json.loads((source_dir / "expected.json").read_text(encoding="utf-8"))["ids"]
    original = kinds["exact"] | kinds["near"]
    out = np.empty((len(ids), *pixels.size, 3), np.uint8)
    with tempfile.TemporaryDirectory(prefix="photoprep-demo-") as tmp:
        render_demo(Path(tmp), seed=seed)
        for k, rid in enumerate(ids):
            data = (Path(tmp) / "cdn" / original.get(rid, rid)).read_bytes()
            out[k] = resized_rgb(data, pixels.size, pixels.fit)
    return out


@dataclass(frozen=True)
class Standin:
    """How ``photoprep pretrain`` makes stand-in weights: the model, its epochs, the size the model
    sees and how the images are stored (as the project's ``bucket`` and ``train`` params say)."""

    model: str
    epochs: int = 20
    image_size: tuple[int, int] = (32, 32)
    pixels: PixelSpec = field(default_factory=lambda: PixelSpec((64, 64)))
    seeds: tuple[int, ...] = (1, 2, 3)  # the renderings drawn (0 is the embedded demo itself)


def pretrain_standin(spec: Standin, out: Path, paths: Layout = PATHS) -> dict[str, Any]:
    """Stand-in pretrained weights for the offline demo: ``spec.model`` (a ``timm/<architecture>``)
    trained on other renderings of the demo's digits (``spec.seeds``: the same digits drawn on
    other backgrounds), the stand-in for ImageNet, saved as safetensors at ``out``. Only the digits
    of the demo's train and val splits are drawn (read from ``data/splits/``: run the pipeline
    first), so no test digit is ever seen; val is the first rendering's val digits."""
    from photoprep.core.params import TrainParams
    from photoprep.learn import pretrained, train
    from photoprep.learn.data import SplitData, TrainData, read_split_table, read_splits_report

    classes = [str(c) for c in read_splits_report(paths.splits_report)["classes"]]
    parts = []
    for name, seeds in (("train", spec.seeds), ("val", spec.seeds[:1])):
        table, _ = read_split_table(paths.split_table(name))
        table = table[table["source"] == "demo"].reset_index(drop=True)
        ids = table["id"].astype(str).tolist()
        pixels = np.concatenate(
            [drawings(ids, seed, spec.pixels, paths.source_dir("demo")) for seed in seeds]
        )
        tables = pd.concat([table.assign(rendering=seed) for seed in seeds], ignore_index=True)
        labels = np.array([classes.index(str(v)) for v in tables["label"]], dtype=np.int64)
        parts.append(SplitData.from_arrays(name, tables, pixels, labels))
    # Each image standardised by its own statistics, as the demo's convnet is: that takes the random
    # backgrounds' colour cast out (with ImageNet's mean and std a ResNet-18 learned far slower
    # here). The weights carry it in their data config: train.normalize: auto fine-tunes alike.
    p = TrainParams(
        model=spec.model, epochs=spec.epochs, image_size=spec.image_size, normalize="image", early_stopping=0
    )
    result = train.fit(TrainData(parts[0], parts[1], classes, "images"), p)
    size = [int(v) for v in spec.image_size]
    config = {
        "input_size": size,
        "mean": [0.0] * 3,
        "std": [1.0] * 3,
        "normalize": "image",
        "interpolation": None,
    }
    digest = pretrained.save_weights(result.state_dict, out, config)
    best = result.meta.get("best_val") or {}
    return {"images": len(parts[0]) + len(parts[1]), "val_accuracy": best.get("accuracy"), "sha256": digest}
