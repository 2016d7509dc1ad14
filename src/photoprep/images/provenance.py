"""What a file's pixels say about where it came from: a lossy history, an up-converted bit depth,
and a small picture to measure edits by. The keep rule (`photoprep.images.keep`) reads these
facts for the members of duplicate groups only, from one more decode each (full scale but for
JPEGs, whose thumbnail needs only a reduced-scale one).

- **JPEG history.** A picture that went through JPEG keeps, at each frequency of JPEG's 8 x 8
  DCT (on the grid from the top-left corner), coefficients close to multiples of that
  frequency's quantisation step, whatever it was saved as later: a PNG or a 16-bit PNG of a JPEG
  still shows them. `jpeg_history` cuts the luma (0.299 R + 0.587 G + 0.114 B, JPEG's own Y)
  into blocks, leaves out blocks that touch black or white (clipping breaks the lattice), takes
  each block's DCT (`scipy.fft.dctn`, orthonormal: JPEG's own coefficients) and, per
  frequency, finds the coarsest lattice the coefficients lie on (a peak of the mean cosine of
  2 pi c / step over the coefficients past half a step). Found at enough frequencies, the
  history's quality is the libjpeg quality whose table the steps fit best. Only files without
  a lossy codec of their own are judged: in a JPEG, a history under its own table (a re-save
  after an edit) shows at high qualities in some pictures and not in others, while untouched
  JPEGs of pictures that had been JPEGs before show theirs (bench/dedup_quality.py's photographs),
  so the keep rule tells JPEG copies apart by the camera record and the medoid instead.
- **Up-converted bit depth.** 16-bit samples that are all multiples of 257 (``v * 257`` is
  ``v << 8 | v``) hold 8 bits: such a file ranks as its 8-bit source (`depth` 8).
- **Thumbnail.** The upright grey picture without the probe's margin, area-averaged to
  `THUMB_SIDE` square: the keep rule's medoid measures edits by mean absolute differences of
  these, which a brightness change or a re-save moves and the perceptual hashes do not.

Why by hand: no maintained Python library estimates a JPEG's quantisation from decoded pixels
(JPEG forensics tools read the coefficients of a JPEG file, which a PNG made from it no longer
has); the DCT itself is scipy's, the decode Pillow's (`photoprep.images.decode`, every guard
included), the 16-bit samples OpenCV's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageFile
from scipy.fft import dctn

from photoprep.core.params import ComputeParams, Params
from photoprep.images import containers, decode, fingerprint, formats, memo, stored
from photoprep.images.decode import (
    LATE_EXIF,
    NO_BUDGET,
    DecodeLimits,
    check_pixels,
    exif_orientation,
    normalised,
    open_image,
    pillow_quiet,
    turn_upright,
)
from photoprep.images.fingerprint import libjpeg_luma_table, trimmed
from photoprep.images.formats import JPEG_FORMATS, ImageRejected
from photoprep.images.keep import Evidence

THUMB_SIDE = 32
"""Side of the grey thumbnail the keep rule's medoid compares (1 KB a member of a group)."""
PROVENANCE_FIELDS = ("history", "depth", "upconverted")

_MAX_BLOCKS = 8192  # blocks analysed at most, spread evenly over the picture (half a megapixel)
_STEP_GRID = np.exp(np.arange(np.log(1.5), np.log(64.0), 0.01))  # lattice steps tried, 1 % apart
_BIN = 0.25  # coefficient resolution of the lattice search
_SUPPORT = 30  # coefficients past half a step needed to judge a frequency
_PEAK = 0.6  # mean cosine at which a lattice counts as found
# Frequencies with a coarser lattice needed for a history. On the benchmark's photographs no
# untouched PNG showed one at any frequency; every PNG of a JPEG (quality 95) showed 8 to 63.
_MIN_FREQUENCIES = 8
_CLIPPED = (2, 253)  # a block with a luma at or beyond these is left out
_LUMA = np.array([0.299, 0.587, 0.114])
_SIXTEEN_BIT_RAWMODES = (";16", "I;16", ";16B", ";16L")
_TABLES = [libjpeg_luma_table(q) for q in range(1, 101)]


@dataclass(frozen=True)
class ProvenanceSpec:
    """What the provenance decode needs: the margin the thumbnail leaves out (the probe's) and
    the decode's limits (those of a later decode of bytes the probe passed)."""

    margin: float = 0.0
    limits: DecodeLimits = NO_BUDGET

    @classmethod
    def from_params(cls, p: Params) -> ProvenanceSpec:
        return cls(p.dedup.margin, DecodeLimits.after_probe(p))

    def settings(self) -> dict[str, Any]:
        """Everything the facts depend on besides the bytes: the memo's key."""
        return {"margin": self.margin, "max_pixels": self.limits.max_pixels, "thumb": THUMB_SIDE}


def provenance(data: bytes, spec: ProvenanceSpec = ProvenanceSpec()) -> tuple[dict, np.ndarray]:
    """The facts of `PROVENANCE_FIELDS` and the thumbnail (uint8 `THUMB_SIDE` square) of `data`.

    history: the quality (1..100) of the JPEG history a file without a lossy codec of its own
    shows, 0 when none shows (and for JPEGs); depth: bits per sample (16 only for 16-bit
    samples that are not up-converted 8-bit ones, else 8); upconverted: 16-bit samples that
    hold 8 bits. Bytes that do not decode (the probe says why) give no history, depth 8 and a
    black thumbnail.
    """
    record: dict = {"history": 0, "depth": 8, "upconverted": False}
    blank = np.zeros((THUMB_SIDE, THUMB_SIDE), np.uint8)
    with pillow_quiet():
        try:
            im = open_image(data, spec.limits, gray=True)
            check_pixels(im, data, spec.limits.max_pixels)
            sixteen = _sixteen_bit(im)
            jpeg = im.format in JPEG_FORMATS
            if jpeg:
                # A JPEG's history is not judged (see the module notes): its thumbnail needs no
                # more than libjpeg's reduced-scale grey.
                im.draft("L", (THUMB_SIDE * 4, THUMB_SIDE * 4))
            orientation = exif_orientation(im) if im.format not in LATE_EXIF else 1
            stored = normalised(im, data, gray=im.mode == "L")
            if im.format in LATE_EXIF:
                orientation = exif_orientation(im)
        except ImageRejected:
            return record, blank
    if not jpeg:
        record["history"] = jpeg_history(np.asarray(stored))
    if sixteen:
        record["upconverted"] = _holds_8_bits(data)
        record["depth"] = 8 if record["upconverted"] else 16
    grey = turn_upright(stored if stored.mode == "L" else stored.convert("L"), orientation)
    thumb = trimmed(grey, spec.margin).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return record, np.asarray(thumb, np.uint8)


def provenance_many(blobs: Iterable[bytes], spec: ProvenanceSpec) -> list[tuple[dict, np.ndarray]]:
    """`provenance` over a batch (one joblib task)."""
    return [provenance(blob, spec) for blob in blobs]


def jpeg_history(pixels: np.ndarray) -> int:
    """The quality (1..100) of the coarsest JPEG quantisation the 8 x 8 DCT coefficients of the
    luma of `pixels` (grey H x W, or RGB H x W x 3) lie on; 0 when fewer than
    `_MIN_FREQUENCIES` frequencies show one."""
    coefficients = _coefficients(pixels)
    if coefficients is None:
        return 0
    steps = []
    for f in range(1, 64):
        found = _coarser_step(coefficients[:, f])
        if found:
            steps.append((f, found))
    if len(steps) < _MIN_FREQUENCIES:
        return 0
    # The libjpeg quality whose table the steps fit best: exact for a history written by libjpeg
    # (so a PNG of a JPEG ties with it), the nearest one for a history an edit scaled.
    frequencies = np.array([f for f, _ in steps])
    logs = np.log(np.array([step for _, step in steps]))
    misfit = [np.abs(logs - np.log(_TABLES[q - 1][frequencies])).sum() for q in range(1, 101)]
    return int(np.argmin(misfit)) + 1


def _coefficients(pixels: np.ndarray) -> np.ndarray | None:
    """The DCT coefficients (blocks x 64, natural order) of the luma of unclipped 8 x 8 blocks, at
    most `_MAX_BLOCKS` of them, spread evenly over the picture; None when too few blocks. Only the
    blocks looked at are converted to floats: a large picture costs a sample, not a copy."""
    rows, cols = pixels.shape[0] // 8, pixels.shape[1] // 8
    count = rows * cols
    if count < _SUPPORT:
        return None
    pool = np.arange(count)
    if count > 4 * _MAX_BLOCKS:
        pool = np.linspace(0, count - 1, 4 * _MAX_BLOCKS).round().astype(np.int64)
    top, left = np.divmod(pool, cols)
    ys = top[:, None] * 8 + np.arange(8)
    xs = left[:, None] * 8 + np.arange(8)
    blocks = pixels[ys[:, :, None], xs[:, None, :]].astype(np.float64)
    if blocks.ndim == 4:  # RGB: JPEG's Y
        blocks = blocks @ _LUMA
    low, high = _CLIPPED
    blocks = blocks[(blocks.min(axis=(1, 2)) > low) & (blocks.max(axis=(1, 2)) < high)]
    if len(blocks) < _SUPPORT:
        return None
    if len(blocks) > _MAX_BLOCKS:
        blocks = blocks[np.linspace(0, len(blocks) - 1, _MAX_BLOCKS).round().astype(np.int64)]
    return dctn(blocks - 128.0, axes=(1, 2), norm="ortho").reshape(len(blocks), 64)


def _coarser_step(values: np.ndarray) -> float | None:
    """The coarsest lattice step (at least 1.5) the coefficients lie on: 0 when none; None when
    too few coefficients to judge."""
    magnitudes = np.abs(values)
    magnitudes = magnitudes[magnitudes >= 0.5]
    if len(magnitudes) < _SUPPORT:
        return None
    bins, counts = np.unique(np.round(magnitudes / _BIN).astype(np.int64), return_counts=True)
    x = bins * _BIN
    candidates = _STEP_GRID[_STEP_GRID >= 1.5]
    past_half = x[None, :] >= candidates[:, None] / 2
    weight = counts[None, :] * past_half
    n = weight.sum(axis=1)
    score = (weight * np.cos(2 * np.pi * x[None, :] / candidates[:, None])).sum(axis=1) / np.maximum(n, 1)
    found = (n >= _SUPPORT) & (score >= _PEAK)
    peak = found.copy()
    peak[1:] &= score[1:] >= score[:-1]
    peak[:-1] &= score[:-1] >= score[1:]
    at = np.flatnonzero(peak)
    return float(candidates[at[-1]]) if len(at) else 0.0


def _sixteen_bit(im: ImageFile.ImageFile) -> bool:
    """The file stores 16-bit samples (16-bit grey, or 16-bit RGB that Pillow reads as 8-bit)."""
    rawmodes = [str(tile.args[0] if isinstance(tile.args, tuple) else tile.args) for tile in im.tile]
    return im.mode.startswith("I;16") or any(r.endswith(_SIXTEEN_BIT_RAWMODES) for r in rawmodes)


def _holds_8_bits(data: bytes) -> bool:
    """Every 16-bit sample is a multiple of 257: an 8-bit picture stored in 16 bits. Read by
    OpenCV, which keeps 16-bit colour samples (Pillow keeps their high bytes only)."""
    samples = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if samples is None or samples.dtype != np.uint16 or not samples.size:
        return False  # not a format OpenCV reads at 16 bits: counted as genuine 16-bit
    return not np.any(samples % 257)


def _provenance_batch(
    located: Sequence[stored.BlobLocation], root: str | Path, spec: ProvenanceSpec
) -> list[tuple[dict, np.ndarray]]:
    return provenance_many(stored.read_blobs(root, located), spec)


def _provenance_part(
    keys: list[str], results: list[tuple[dict, np.ndarray]]
) -> tuple[pd.DataFrame, np.ndarray]:
    rows = pd.DataFrame([facts for facts, _ in results], columns=list(PROVENANCE_FIELDS))
    rows.insert(0, "sha256", keys)
    return rows, np.stack([thumb for _, thumb in results])


def provenance_reader(raw_dir: Path, spec: ProvenanceSpec, compute: ComputeParams) -> Evidence:
    """The keep rule's evidence (`photoprep.images.keep.Evidence`) from the shard store: the facts
    and the thumbnail of rows of the stage's table, each distinct sha256 decoded at most once per
    spec and code (memoized like the probe)."""
    code = (sys.modules[__name__], decode, fingerprint, formats, containers)
    key = memo.fingerprint(spec.settings(), *code)
    job = stored.Pass(
        "provenance", key, _provenance_batch, (spec,), _provenance_part, "provenance", arrays=True
    )

    def evidence(rows: pd.DataFrame) -> pd.DataFrame:
        cache = stored.decode_missing(rows, raw_dir, compute, job)
        keys = rows["sha256"].tolist()
        facts = cache.rows(keys)[list(PROVENANCE_FIELDS)].set_index(rows.index)
        return facts.assign(thumb=[thumb.tobytes() for thumb in cache.arrays(keys)])

    return evidence
