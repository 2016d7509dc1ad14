"""The keep rule: which copy of a duplicate group is kept, and on what each other copy lost.

``dedup.keep: best`` (the default) ranks the copies criterion by criterion, and the first
criterion on which two copies differ decides between them (`KEEP_REASONS`):

1. ``colour``: colour over grey;
2. ``pixels``: the most pixels;
3. ``lossless``: lossless over lossy, where a lossless file whose pixels show a JPEG history
   (a PNG or TIFF made from a JPEG) ranks as that history: lossy;
4. ``depth``: more bits per sample, where 16-bit samples up-converted from 8 bits count as 8;
5. ``history``: fewer marks of a conversion in the pixels (a JPEG history in a lossless file,
   an up-converted bit depth): a file made from another after the one it was made from;
6. ``camera``: the camera original (EXIF names a camera or a capture time) over a copy that
   lost that record: a higher quality setting on a later copy cannot add back what the first
   encode removed, so the capture's own file ranks before the quality of re-saves;
7. ``quality``: the higher JPEG quality (a lossless file with a JPEG history ranks at that
   history's quality);
8. ``medoid``: the copy closest to all the others, by the mean absolute difference of their
   grey thumbnails (an edit moves a copy away from the rest; the untouched original, one edit
   from each copy, is the nearest to all of them);
9. ``key``: the smallest (source, id), which decides only an exact tie.

The pixel facts (history, depth, thumbnail: `photoprep.images.provenance`) come from one more
decode of each distinct payload of a group with two or more payloads, asked for through
`evidence` (see `rank`); without it they take no part and the medoid ties.

``keep: largest`` ranks by pixels then key (photoprep's rule before ``best``); ``keep: first``
by source order (the order of `sources`, then the manifest line, then the id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from photoprep.core.params import DedupParams

KEEP_REASONS = (
    "colour",
    "pixels",
    "lossless",
    "depth",
    "quality",
    "history",
    "camera",
    "medoid",
    "key",
    "first",
)

Evidence = Callable[[pd.DataFrame], pd.DataFrame]
"""Given rows of the dedup table (a group's distinct payloads), their pixel facts: a frame with
the same index and the columns of `EVIDENCE_DEFAULTS` (``thumb``: the thumbnail's bytes)."""

EVIDENCE_DEFAULTS = {"history": 0, "depth": 8, "upconverted": False, "thumb": b""}

# What the criteria read of a candidate.
_READS: tuple[str, ...] = ("_group", "_sha", "source", "id", "width", "height", "first_line")
_READS += ("colour", "lossless", "quality", "camera")

_MEDOID_REFERENCES = 256  # members a copy is compared with at most (the first ones of its group)
_PAIRS_PER_STEP = 1 << 15


def _payloads(groups: np.ndarray, payloads: np.ndarray) -> np.ndarray:
    """One int64 for each (group, payload number) pair: equal exactly when both are."""
    return groups.astype(np.int64) * (int(payloads.max(initial=0)) + 1) + payloads


def needs_evidence(candidates: pd.DataFrame, groups: np.ndarray) -> np.ndarray:
    """Rows whose group holds two or more distinct payloads (the others tie on every fact), one
    row per payload (`_sha`: the payload's number)."""
    distinct = pd.DataFrame({"g": groups, "payload": _payloads(groups, candidates["_sha"].to_numpy())})
    first = ~distinct.duplicated("payload").to_numpy()
    payloads = distinct[first].groupby("g").size()
    return first & (pd.Series(groups).map(payloads).to_numpy() > 1)


@dataclass(frozen=True)
class Ranking:
    """How the copies of each group rank: `order` holds the candidates' positions best first
    within each group (groups ascending), `values` the columns they were sorted by (a row per
    candidate position), `criteria` those columns with their reasons, in sort order."""

    order: np.ndarray
    values: pd.DataFrame
    criteria: list[tuple[str, str]]

    def deciding(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """For candidate positions (a[i], b[i]): the reason of the first criterion on which
        they differ (the last criterion's where none does)."""
        reason = np.full(len(a), self.criteria[-1][1], dtype=object)
        decided = np.zeros(len(a), bool)
        for column, name in self.criteria:
            values = self.values[column].to_numpy()
            differs = (values[a] != values[b]) & ~decided
            reason[differs] = name
            decided |= differs
        return reason


def rank(
    candidates: pd.DataFrame,
    p: DedupParams,
    sources: Sequence[str] | None,
    facts: pd.DataFrame | None = None,
) -> Ranking:
    """The ranking of `candidates` (with their `_group`, and `_sha`: their payload's number) within
    each group by the criteria of `p.keep`. `facts` are the evidence of rows that need it
    (`needs_evidence`), shared here by every row of the same payload in the group. Only the
    columns the criteria read are copied."""
    frame = candidates[[c for c in _READS if c in candidates.columns]].copy()
    criteria = _criteria(frame, p, sources, facts)
    columns = ["_group", *(c for c, _ in criteria)]
    values = frame[columns].reset_index(drop=True)
    order = values.sort_values(columns, kind="stable").index.to_numpy()
    return Ranking(order=order, values=values, criteria=criteria)


def _criteria(
    frame: pd.DataFrame, p: DedupParams, sources: Sequence[str] | None, facts: pd.DataFrame | None
) -> list[tuple[str, str]]:
    """(column, reason) to sort by, ascending, for `p.keep`; adds the columns to `frame`."""
    frame["_pixels"] = -(frame["width"].astype(np.int64) * frame["height"].astype(np.int64))
    frame["_key"] = frame["source"] + "/" + frame["id"]
    if p.keep == "largest":
        return [("_pixels", "pixels"), ("_key", "key")]
    if p.keep == "first":
        order = {name: i for i, name in enumerate(sources or sorted(set(frame["source"])))}
        position = frame["source"].map(order).fillna(len(order)).astype(np.int64)
        line = frame["first_line"].fillna(0).astype(np.int64) if "first_line" in frame else 0
        frame["_first"] = position * (1 << 40) + line
        return [("_first", "first"), ("_key", "key")]
    evidence = _shared_evidence(frame, facts)
    history = evidence["history"].to_numpy(np.int64)
    lossless = frame["lossless"].astype(bool).to_numpy()
    converted = lossless & (history > 0)  # a lossless file holding a JPEG's pixels
    frame["_grey"] = ~frame["colour"].astype(bool)
    frame["_lossy"] = ~lossless | converted
    frame["_depth"] = -evidence["depth"].to_numpy(np.int64)
    frame["_marks"] = converted.astype(np.int64) + evidence["upconverted"].to_numpy(bool)
    frame["_no_camera"] = ~frame["camera"].astype(bool)
    frame["_quality"] = -np.where(converted, history, frame["quality"].astype(np.int64).to_numpy())
    frame["_medoid"] = medoid_cost(frame["_group"].to_numpy(), evidence["thumb"])
    return [
        ("_grey", "colour"),
        ("_pixels", "pixels"),
        ("_lossy", "lossless"),
        ("_depth", "depth"),
        ("_marks", "history"),
        ("_no_camera", "camera"),
        ("_quality", "quality"),
        ("_medoid", "medoid"),
        ("_key", "key"),
    ]


def _shared_evidence(frame: pd.DataFrame, facts: pd.DataFrame | None) -> pd.DataFrame:
    """The evidence of every row: its payload's facts within its group, else the defaults."""
    out = pd.DataFrame({c: [v] * len(frame) for c, v in EVIDENCE_DEFAULTS.items()}, index=frame.index)
    if facts is None or facts.empty:
        return out
    payload = pd.Series(_payloads(frame["_group"].to_numpy(), frame["_sha"].to_numpy()), index=frame.index)
    known = facts[list(EVIDENCE_DEFAULTS)].set_index(payload.loc[facts.index].to_numpy())
    shared = known.reindex(payload.to_numpy())
    found = shared["history"].notna().to_numpy()
    for column in EVIDENCE_DEFAULTS:
        values = out[column].to_numpy(object, copy=True)
        values[found] = shared[column].to_numpy(object)[found]
        out[column] = values
    return out


def medoid_cost(groups: np.ndarray, thumbs: pd.Series) -> np.ndarray:
    """Sum of the mean absolute thumbnail differences from each row to its group's members (the
    first `_MEDOID_REFERENCES` of them in row order); 0 for a row without a thumbnail.

    Computed as pairs (row, reference) in steps of `_PAIRS_PER_STEP`, so the working set stays
    bounded whatever the groups' sizes.
    """
    cost = np.zeros(len(groups), np.float64)
    has = thumbs.map(len).to_numpy() > 0
    rows = np.flatnonzero(has)
    if len(rows) < 2:
        return cost
    pixels = np.stack([np.frombuffer(thumbs.iat[i], np.uint8) for i in rows]).astype(np.int16)
    _, local = np.unique(groups[rows], return_inverse=True)
    order = np.argsort(local, kind="stable")
    starts = np.searchsorted(local[order], np.arange(local.max() + 1))
    sizes = np.bincount(local)
    refs = np.minimum(sizes, _MEDOID_REFERENCES)
    a = np.repeat(np.arange(len(rows)), refs[local])
    offset = np.arange(len(a)) - np.repeat(np.cumsum(refs[local]) - refs[local], refs[local])
    b = order[starts[local[a]] + offset]
    total = np.zeros(len(rows), np.float64)
    for step in range(0, len(a), _PAIRS_PER_STEP):
        i, j = a[step : step + _PAIRS_PER_STEP], b[step : step + _PAIRS_PER_STEP]
        np.add.at(total, i, np.abs(pixels[i] - pixels[j]).mean(axis=1))
    cost[rows] = total
    return cost
