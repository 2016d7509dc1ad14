"""The probe: the decode the dedup stage makes of every payload, and the record it gives.

In a single pass `probe` reads the header (format, size, mode), rejects bombs before any pixel
is allocated (`photoprep.images.decode`), decodes the whole image to prove the data is
complete, and computes the perceptual hashes from the same decode (`photoprep.images.fingerprint`).
JPEGs are decoded by libjpeg at reduced scale: for a JPEG the grey is libjpeg's at the draft
scale whose shorter side stays >= `hash_side`; for other formats the same scale factor is
applied with `Image.reduce`, so one picture hashes alike as PNG or JPEG.

The probe's verdict on the bytes (``valid`` and one of `DECODE_REASONS`) is the dedup stage's:
it must decode to hash, and a payload that does not decode takes no part in grouping. The
validate stage (`photoprep.images.validate`) turns it into the dataset's verdict.

The probe also reads what the dedup stage needs to keep the best copy: whether the picture has
colour (chroma at the hash scale), whether the format is lossless, the JPEG quality estimated
from the quantisation tables, whether EXIF names a camera and, when asked, the hashes of
transformed versions (mirror, rotations) and of crops. Its settings travel as one `ProbeSpec`.

The finer hashes (`FINE_HASH`, of the picture and of each crop) are not in the probe: only a
verification (`dedup.verify_threshold`) or a crop match reads them, for the few candidates it
joins, and their 64 x 64 Lanczos resizes made the probe cost 2.743 CPU ms a photo against
1.685 without them (`bench/probe.py --against-rev f82dedc`, bench/scale.py's JPEGs).
`fine_reader` computes them for the rows asked, from the same decode steps (a second decode of
those few rows), memoized like the probe.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile

from photoprep.core import parallel
from photoprep.core.params import ComputeParams, DedupParams, Params
from photoprep.images import containers, decode, fingerprint, formats, memo, stored
from photoprep.images.decode import (
    LATE_EXIF,
    NO_BUDGET,
    DecodeLimits,
    check_budget,
    check_pixels,
    draft_factor,
    exif_orientation,
    has_alpha,
    load,
    normalised,
    open_image,
    oriented,
    pillow_quiet,
    turn_upright,
)
from photoprep.images.fingerprint import (
    COLOUR_CHROMA,
    FINE_HASH,
    check_hash,
    check_transforms,
    check_trims,
    crop_trim,
    hash_side,
    jpeg_quality,
    mean_chroma,
    names_a_camera,
    transformed,
    trimmed,
    view_hashes,
)
from photoprep.images.formats import JPEG_FORMATS, ImageRejected, codec_versions, stores_exactly
from photoprep.ingest import sniff

PROBE_FIELDS = (
    "format",
    "width",
    "height",
    "mode",
    "valid",
    "reason",
    "hash",
    "colour",
    "lossless",
    "quality",
    "camera",
    "transform_hashes",
    "crop_hashes",
)

FINE_FIELDS = ("fine_hash", "crop_fine_hashes")
"""What `fine_hashes` gives: the `FINE_HASH` of the picture and of each crop (comma-separated)."""


@dataclass(frozen=True)
class ProbeSpec:
    """What the probe needs to know, built once from the params: the hash, the transforms and
    crops also hashed, the margin every hash leaves out, and the decode's limits.

    The defaults hash the whole picture (no margin) with a 64-bit phash: the demo's generator
    and the benchmarks use them. Checked when made: a bad hash, transform or trim is a
    ValueError here, never a reason on an image.
    """

    hash_name: str = "phash"
    hash_size: int = 8
    transforms: tuple[str, ...] = ()
    margin: float = 0.0
    crops: tuple[float, ...] = ()
    limits: DecodeLimits = NO_BUDGET

    def __post_init__(self) -> None:
        check_hash(self.hash_name, self.hash_size)
        check_transforms(self.transforms)
        check_trims(self.trims)

    @classmethod
    def from_params(cls, p: Params) -> ProbeSpec:
        """The dedup stage's probe: `dedup`'s hash, transforms, margin and crops, and the limits
        of every decode."""
        return cls.from_dedup(p.dedup, DecodeLimits.from_params(p))

    @classmethod
    def from_dedup(cls, d: DedupParams, limits: DecodeLimits = NO_BUDGET) -> ProbeSpec:
        """The probe of dedup params `d` under `limits`."""
        return cls(d.hash, d.hash_size, tuple(d.transforms), d.margin, tuple(d.crops), limits)

    @property
    def trims(self) -> tuple[float, ...]:
        """The share of each side each hash leaves out: the margin, then each crop's."""
        return (self.margin, *(crop_trim(c, self.margin) for c in self.crops))

    def settings(self) -> dict[str, Any]:
        """Everything a probe record depends on besides the bytes: the memo's key."""
        return {
            "hash": self.hash_name,
            "hash_size": self.hash_size,
            "max_pixels": self.limits.max_pixels,
            "max_decode_mb": self.limits.max_decode_mb,
            "transforms": list(self.transforms),
            "margin": self.margin,
            "crops": list(self.crops),
            "codecs": codec_versions(),
        }


WHOLE_PICTURE = ProbeSpec()


def probe(data: bytes, spec: ProbeSpec = WHOLE_PICTURE) -> dict:
    """Everything the dedup and validate stages need from one decode of `data`.

    Returns a dict with the keys of `PROBE_FIELDS`: format ("" when not identified), width
    and height after EXIF orientation (0 when not identified; a rejected image keeps its
    header size), mode as stored (e.g. "CMYK", "I;16", "P"), valid, reason ("" or one of
    `DECODE_REASONS`), hash (hex of the spec's hash, "" when invalid), colour (the picture has
    chroma), lossless (the format stores pixels exactly), quality (JPEG quality estimated from
    the quantisation tables, 0 when unknown or not a JPEG), camera (EXIF names a camera or a
    capture time), transform_hashes (the hash of each of the spec's transforms,
    comma-separated, "" when none asked) and crop_hashes (the hash of the picture as a copy
    cropped by each of the spec's crops of every side would hash, comma-separated).
    Every hash is of the picture without the spec's margin of each side (`trimmed`): a caption
    band, a frame or a watermark strip there changes nothing.
    The result depends only on the bytes, the spec and the codec versions (`codec_versions`).
    """
    record: dict = dict.fromkeys(PROBE_FIELDS, "")
    record.update(width=0, height=0, valid=False, colour=False, lossless=False, quality=0, camera=False)
    with pillow_quiet():
        try:
            gray, chroma = _upright_gray(data, spec, record)
        except ImageRejected as rejected:
            record["reason"] = rejected.reason
            if not record["format"]:  # refused before opening: the format its signature names
                record["format"] = containers.format_of(data)
            return record
        record.update(_hashes(gray, spec), colour=chroma >= COLOUR_CHROMA)
    record["valid"] = True
    return record


def probe_many(blobs: Iterable[bytes], spec: ProbeSpec = WHOLE_PICTURE) -> list[dict]:
    """`probe` over a batch (one joblib task)."""
    return [probe(blob, spec) for blob in blobs]


def _upright_gray(data: bytes, spec: ProbeSpec, record: dict) -> tuple[Image.Image, float]:
    """The upright grey picture at the hash scale and its mean chroma; the header's facts go into
    `record` as they are read, so a rejected image keeps them."""
    limits = spec.limits
    im = open_image(data, limits, gray=True)
    record.update(format=im.format or "", mode=im.mode)
    header_size = im.size
    jpeg = im.format in JPEG_FORMATS
    orientation = exif_orientation(im) if im.format not in LATE_EXIF else 1
    record["width"], record["height"] = oriented(header_size, orientation)
    check_pixels(im, data, limits.max_pixels)
    record.update(lossless=stores_exactly(im, data), quality=jpeg_quality(im))
    # The same decode scale whatever the margin and crops (the default's deepest trim,
    # 15 % a side, still leaves 134 of 192 pixels): a hash never depends on the crops asked.
    side = hash_side(spec.hash_size)
    if jpeg:
        # Y (the grey the hash is computed on) and chroma straight from libjpeg, at the
        # smallest 1/1..1/8 scale whose shorter side is still >= `side`; the whole
        # stream is still decoded.
        im.draft(_jpeg_draft_mode(im), (side, side))
    check_budget(im, data, header_size, limits.max_decode_mb, gray=True)
    gray, chroma = _decode_gray(im, data, jpeg, side)
    if im.format in LATE_EXIF:
        orientation = exif_orientation(im)
        record["width"], record["height"] = oriented(header_size, orientation)
    record["camera"] = names_a_camera(im)  # after the decode: a PNG's EXIF may follow its pixels
    gray = turn_upright(gray, orientation)
    if not jpeg:
        # Same scale rule as the JPEG draft, so a PNG and a JPEG of one picture hash
        # alike; after the rotation, so a rotation tag and rotated pixels hash alike.
        factor = draft_factor(gray.size, (side, side))
        if factor > 1:
            gray = gray.reduce(factor)
    return gray, chroma


def _hashes(gray: Image.Image, spec: ProbeSpec) -> dict[str, str]:
    """The hash fields of a record, from the upright grey picture at the hash scale: the hash
    of all views at once (`view_hashes`)."""
    picture = trimmed(gray, spec.margin)
    turned = [transformed(picture, t) for t in spec.transforms]
    coarse = view_hashes([picture, *turned, *_crops_seen(gray, spec)], spec.hash_name, spec.hash_size)
    n_turned = len(turned)
    return {
        "hash": coarse[0],
        "transform_hashes": ",".join(coarse[1 : 1 + n_turned]),
        "crop_hashes": ",".join(coarse[1 + n_turned :]),
    }


def _crops_seen(gray: Image.Image, spec: ProbeSpec) -> list[Image.Image]:
    return [trimmed(gray, trim) for trim in spec.trims[1:]]


def fine_hashes(data: bytes, spec: ProbeSpec = WHOLE_PICTURE) -> dict[str, str]:
    """The `FINE_FIELDS` of `data`: the `FINE_HASH` of the picture without the spec's margin
    (fine_hash) and of each of its crops (crop_fine_hashes, comma-separated), from the decode
    the probe makes, so they are the views the probe's hashes are of. Empty strings when the
    bytes do not decode (the probe said so: such a payload is no candidate)."""
    with pillow_quiet():
        try:
            gray, _ = _upright_gray(data, spec, {})
        except ImageRejected:
            return dict.fromkeys(FINE_FIELDS, "")
        fine = view_hashes([trimmed(gray, spec.margin), *_crops_seen(gray, spec)], *FINE_HASH)
    return {"fine_hash": fine[0], "crop_fine_hashes": ",".join(fine[1:])}


def _decode_gray(im: ImageFile.ImageFile, data: bytes, jpeg: bool, side: int) -> tuple[Image.Image, float]:
    """The grey image the hash is computed on, and the picture's mean chroma (see
    `COLOUR_CHROMA`), from one decode. A JPEG drafted in YCbCr gives both from libjpeg."""
    if jpeg and im.mode == "YCbCr":
        load(im, data)
        return im.getchannel(0), mean_chroma(im)
    if im.mode in ("1", "I", "F") or im.mode.startswith("I;16") or (im.mode == "L" and not has_alpha(im)):
        return normalised(im, data, gray=True), 0.0
    rgb = normalised(im, data, gray=False)
    factor = draft_factor(rgb.size, (side, side))
    small = rgb.reduce(factor) if factor > 1 else rgb
    return rgb.convert("L"), mean_chroma(small.convert("YCbCr"))


def _jpeg_draft_mode(im: Image.Image) -> str:
    """YCbCr for colour JPEGs stored as YCbCr (Y is the grey libjpeg would give); RGB for
    those stored as RGB (Adobe transform 0), which libjpeg cannot turn into YCbCr."""
    if im.mode in ("RGB", "YCbCr"):
        return "RGB" if im.info.get("adobe_transform") == 0 else "YCbCr"
    return "L"


PROBE_COLUMNS = ["decode_reason" if field == "reason" else field for field in PROBE_FIELDS]
"""The probe's fields as the dedup stage's table names them (its reason is the decode's)."""


def _probe_batch(located: Sequence[stored.BlobLocation], root: str | Path, spec: ProbeSpec) -> list[dict]:
    return probe_many(stored.read_blobs(root, located), spec)


def _probe_part(keys: list[str], results: list[dict[str, Any]]) -> tuple[pd.DataFrame, None]:
    rows = pd.DataFrame(results).rename(columns={"reason": "decode_reason"})
    rows.insert(0, "sha256", keys)
    return rows[["sha256", *PROBE_COLUMNS]], None


def _fine_batch(located: Sequence[stored.BlobLocation], root: str | Path, spec: ProbeSpec) -> list[dict]:
    return [fine_hashes(blob, spec) for blob in stored.read_blobs(root, located)]


def _fine_part(keys: list[str], results: list[dict[str, str]]) -> tuple[pd.DataFrame, None]:
    rows = pd.DataFrame(results, columns=list(FINE_FIELDS))
    rows.insert(0, "sha256", keys)
    return rows, None


def _passes_code() -> tuple[Any, ...]:
    # The sniff names the reason of payloads no opener identifies, so it is part of the value too.
    return (sys.modules[__name__], decode, fingerprint, formats, containers, sniff)


def probe_images(table: pd.DataFrame, raw_dir: Path, spec: ProbeSpec, compute: ComputeParams) -> pd.DataFrame:
    """Format, size after orientation, mode, validity, perceptual hashes and the facts the
    keep rule reads (`probe`) of each row's bytes, as `PROBE_COLUMNS`.

    Rows need `source`, `shard`, `offset`, `size`, `sha256`. Each distinct sha256 is decoded at
    most once per spec and decoder code; later calls read the memo, which takes one part per
    batch as the batch comes back (a killed run keeps the finished batches).
    """
    key = memo.fingerprint(spec.settings(), *_passes_code())
    job = stored.Pass("probe", key, _probe_batch, (spec,), _probe_part, "decode+hash")
    cache = stored.decode_missing(table, raw_dir, compute, job)
    # The workers end here: the memo's compaction, the rows and the dedup's table steps after
    # them run in this process, and would otherwise stand on top of idle workers' heap.
    parallel.release_workers()
    if cache.parts > memo.COMPACT_PARTS:
        cache.compact()
    return cache.rows(table["sha256"].tolist())[PROBE_COLUMNS].set_index(table.index)


def fine_reader(
    raw_dir: Path, spec: ProbeSpec, compute: ComputeParams
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The dedup stage's reader of fine hashes (`photoprep.images.dedup.FineHashes`): the
    `FINE_FIELDS` (`fine_hashes`) of rows of its table, indexed like them. Rows need the
    columns `probe_images` reads; each distinct sha256 is decoded at most once per spec and
    code (memoized like the probe), and only when asked."""
    key = memo.fingerprint(spec.settings(), *_passes_code())
    job = stored.Pass("fine", key, _fine_batch, (spec,), _fine_part, "fine hashes")

    def fine(rows: pd.DataFrame) -> pd.DataFrame:
        cache = stored.decode_missing(rows, raw_dir, compute, job)
        return cache.rows(rows["sha256"].tolist())[list(FINE_FIELDS)].set_index(rows.index)

    return fine
