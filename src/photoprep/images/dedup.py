"""Duplicates: byte-identical payloads and perceptually near-identical images, one copy kept.

Pairs become groups (connected components): rows with the same sha256; rows whose hashes are
within `near_threshold` bits (optionally confirmed by the 256-bit fine hash,
`verify_threshold`); with `crops`, a row whose hash is within the threshold of another row's
cropped hash (what a copy of it cropped by that share of each side hashes to); and with
`transforms`, a row whose hash is within the threshold of another row's mirrored or rotated
hash. Every hash leaves out `margin` of each side of the picture (the probe's). Broken
payloads take no part: the validate stage reports each of them.

Which copy a group keeps (`dedup.keep`) is the keep rule's (`photoprep.images.keep`).
`keep_reason` says for the kept row which criterion made it win over the runner-up, and for
every other member which criterion it lost on (`keep.KEEP_REASONS`).

Counts are by pair, not by the copy kept: within a group, every row byte-identical to a row
ranked before it is ``exact``; the first row of each distinct payload other than the kept
one is ``near`` (or ``near_crop`` when a cropped hash of it or of the kept copy is closest,
``near_hflip``, ``near_rot90``, ... when the kept copy's transformed hash is). So
``exact_duplicates`` counts the redundant byte copies whatever is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from photoprep.core.errors import UserError
from photoprep.core.params import DedupParams
from photoprep.images import graph, hamming, keep

CROP_FINE_THRESHOLD = 56
"""A match through a cropped hash counts only when the fine hashes (256 bits) of the two views
are within this distance. On bench/dedup_quality.py's photographs the true crop matches were
at most 46 apart; the one false crop match of the demo (two different handwritten 3s, 4 bits
apart in the 64-bit hash) 70."""

_PACK_ROWS = 1 << 16  # hex hashes made Python strings at once while packing them

GROUPING_ONLY = ("fine_hash", "transform_hashes", "crop_hashes", "crop_fine_hashes")
"""Probe columns only grouping and ranking read: the dedup stage's table leaves them out."""

# Probe columns the keep rule reads, and their values when a table lacks them.
_DEFAULTS = {
    "colour": True,
    "lossless": False,
    "quality": 0,
    "camera": False,
    "fine_hash": "",
    "transform_hashes": "",
    "crop_hashes": "",
    "crop_fine_hashes": "",
    "format": "",
}

_HEX = ("hash", *GROUPING_ONLY)
"""The hex hash columns: grouping reads them where they are (`_Hex`), never copied whole."""

# What grouping (`_groups`), ranking (`keep.rank`) and `_assign` read of a record, besides `_HEX`
# and the sha256 (read once, to number the payloads: `_sha`).
_RANKED_COLUMNS: tuple[str, ...] = ("source", "id", "width", "height", "first_line")
_RANKED_COLUMNS += ("colour", "lossless", "quality", "camera", "format")


@dataclass(frozen=True)
class _Hex:
    """The candidates' hex hash columns, read in place in the table: `rows` are the table
    positions of the candidates, in candidate order. Only the values asked for become Python
    strings."""

    table: pd.DataFrame
    rows: np.ndarray

    def take(self, name: str, positions: np.ndarray) -> list[str]:
        """The values of the candidates at `positions`."""
        return self.table[name].iloc[self.rows[positions]].fillna(_DEFAULTS.get(name, "")).tolist()

    def slices(self, name: str) -> Iterator[tuple[int, pd.Series]]:
        """(first candidate position, values) of `_PACK_ROWS` candidates at a time."""
        column = self.table[name]
        for start in range(0, len(self.rows), _PACK_ROWS):
            values = column.iloc[self.rows[start : start + _PACK_ROWS]]
            yield start, values.fillna(_DEFAULTS.get(name, ""))

    def packed(self, name: str) -> np.ndarray:
        """Every candidate's hash packed (N x B bytes)."""
        parts = [hamming.pack_hashes(values.tolist()) for _, values in self.slices(name)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.uint8)


@dataclass
class DedupResult:
    table: pd.DataFrame  # every record, with group, dup_of, dup_reason, dup_distance, keep_reason
    counts: dict[str, int] = field(default_factory=dict)


def read_raw_tables(raw_dir: Path, sources: list[str]) -> pd.DataFrame:
    """The download tables of the enabled sources, one after another."""
    frames = []
    for name in sources:
        path = Path(raw_dir) / f"{name}.parquet"
        if not path.exists():
            raise UserError(f"source '{name}': {path} not found (run the download@{name} stage)")
        frames.append(pd.read_parquet(path))
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["source", "id"], kind="stable").reset_index(drop=True)


def _popcounts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(axis=1).astype(np.int64)


def _distances(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    if not len(a):
        return np.zeros(0, np.int64)
    return _popcounts(hamming.pack_hashes(list(a)), hamming.pack_hashes(list(b)))


def _first_rows(inverse: np.ndarray, n_unique: int) -> np.ndarray:
    """The first input row of each distinct hash."""
    first = np.full(n_unique, len(inverse), np.int64)
    np.minimum.at(first, inverse, np.arange(len(inverse)))
    return first


def _near_edges(hexes: _Hex, hashes: np.ndarray, p: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs joined by near hashes (`hashes`: the rows' packed hashes), from one search:

    - each row to the first row of its hash, and the first rows of hashes within the
      threshold (with `verify_threshold`, only pairs whose fine hashes are that close);
    - with `crops`, each row to the rows whose cropped hash is within the threshold of its
      hash, when the fine hashes of the two views are within `CROP_FINE_THRESHOLD` (or
      `verify_threshold` when smaller);
    - with `transforms`, each row to the rows whose mirrored or turned hash is within the
      threshold of its hash.

    The cropped and transformed hashes are the search's second set (`others`): only their
    pairs with a row's own hash are found, never a pair of two of them.
    """
    crop_rows, cropped = _extra_hashes(hexes, "crop_hashes", len(p.crops))
    turn_rows, turned = _extra_hashes(hexes, "transform_hashes", len(p.transforms))
    sets = [s for s in (cropped, turned) if s is not None]
    others = np.concatenate(sets) if sets else None
    near = hamming.near_duplicate_pairs(hashes, p.near_threshold, others)
    first = _first_rows(near.inverse, len(near.unique))
    a = np.concatenate([np.arange(len(hashes)), first[near.pairs[:, 0]]])
    b = np.concatenate([first[near.inverse], first[near.pairs[:, 1]]])
    if p.verify_threshold is not None and len(a):
        joined = a != b  # a row and the first row of its own hash share it: only other pairs
        keep = np.ones(len(a), bool)
        fine = hexes.take("fine_hash", a[joined]), hexes.take("fine_hash", b[joined])
        keep[joined] = _distances(*fine) <= p.verify_threshold
        a, b = a[keep], b[keep]
    src, dst = [a], [b]
    if len(near.across):
        # Every row whose extra hash is a found `other` joins the first row of the near hash.
        entries = pd.DataFrame({"w": near.other_inverse, "entry": np.arange(len(near.other_inverse))})
        links = pd.DataFrame({"u": near.across[:, 0], "w": near.across[:, 1]}).merge(entries, on="w")
        a, entry = first[links["u"].to_numpy()], links["entry"].to_numpy()
        n_cropped = 0 if cropped is None else len(cropped)
        is_crop = entry < n_cropped
        # A crop match counts once the fine hashes of the two views agree (split only here).
        crop, position = np.divmod(entry[is_crop], max(1, len(crop_rows)))
        b = crop_rows[position]
        crop_fine = hexes.take("crop_fine_hashes", b)
        seen = _distances(
            hexes.take("fine_hash", a[is_crop]),
            [views.split(",")[j] for views, j in zip(crop_fine, crop, strict=True)],
        )
        limit = min(CROP_FINE_THRESHOLD, 256 if p.verify_threshold is None else p.verify_threshold)
        src += [a[is_crop][seen <= limit], a[~is_crop]]
        dst += [b[seen <= limit], turn_rows[(entry[~is_crop] - n_cropped) % max(1, len(turn_rows))]]
    return np.concatenate(src), np.concatenate(dst)


def _codes(column: pd.Series) -> np.ndarray:
    """Each value's number, in the order values first appear (`pd.factorize`'s), from Arrow's
    hash kernel: no Python string is made (pandas' factorize made one per row)."""
    encoded = pa.array(column, from_pandas=True).dictionary_encode(null_encoding="encode")
    return encoded.indices.to_numpy().astype(np.int64)


def _extra_hashes(hexes: _Hex, name: str, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows that have k comma-separated hashes in column `name` (cropped or transformed), and
    those hashes packed one kind after another (every row's first, then every row's second,
    ...); (empty, None) when k is 0 or no row has them."""
    found, hashes = [], []
    for start, values in hexes.slices(name) if k else ():
        commas = values.str.count(",").to_numpy()
        rows = np.flatnonzero((values.str.len().to_numpy() > 0) & (commas == k - 1))
        if len(rows):
            found.append(start + rows)
            hashes.append(hamming.pack_hashes(",".join(values.iloc[rows]).split(",")))  # k a row
    if not found:
        return np.zeros(0, np.int64), None
    rows, packed = np.concatenate(found), np.concatenate(hashes)
    others = packed.reshape(len(rows), k, -1).transpose(1, 0, 2).reshape(len(rows) * k, -1)
    return rows, np.ascontiguousarray(others)


def _groups(candidates: pd.DataFrame, hexes: _Hex, hashes: np.ndarray, p: DedupParams) -> np.ndarray:
    n = len(candidates)
    # Byte-identical payloads: each row joins the first row that has its sha256.
    sha = candidates["_sha"].to_numpy()
    src, dst = [np.arange(n)], [_first_rows(sha, int(sha.max()) + 1 if n else 0)[sha]]
    if p.near_threshold >= 0 and n:
        near_src, near_dst = _near_edges(hexes, hashes, p)
        src.append(near_src)
        dst.append(near_dst)
    a, b = np.concatenate(src), np.concatenate(dst)
    return graph.components(n, a, b)


def find_duplicates(
    images: pd.DataFrame,
    p: DedupParams,
    sources: Sequence[str] | None = None,
    evidence: keep.Evidence | None = None,
) -> DedupResult:
    """Group byte-identical and perceptually near-identical images; keep one per group.

    `images` has one row per record with `status`, `sha256`, `valid`, `hash`, `width`,
    `height`, and the probe's `colour`, `lossless`, `quality`, `camera`, `fine_hash`,
    `transform_hashes` (defaults when absent). `sources` orders sources for ``keep: first``.
    `evidence` gives the pixel facts of the keep rule (`photoprep.images.keep`) for the rows of
    `images` it is asked about: one per distinct payload of each group with two or more.
    """
    table = images.copy(deep=False)  # copy-on-write: the caller's frame is never changed
    for column, default in _DEFAULTS.items():
        if column not in table:
            table[column] = default
    table["group"] = -1
    table["dup_of"] = ""
    table["dup_reason"] = ""
    table["dup_distance"] = -1
    table["keep_reason"] = ""
    is_candidate = (table["status"] == "ok") & table["valid"].fillna(False).astype(bool)
    # Only the narrow columns grouping and ranking read are copied, however wide the download
    # table is; the hex hashes are read where they are.
    rows = np.flatnonzero(is_candidate.to_numpy())
    candidates = table[[c for c in _RANKED_COLUMNS if c in table.columns]].iloc[rows]
    for column, default in _DEFAULTS.items():
        if column in candidates and column not in _HEX:
            candidates[column] = candidates[column].fillna(default)
    if len(candidates):
        by = ["source", "id"]
        ordered = candidates[by].reset_index(drop=True).sort_values(by, kind="stable").index.to_numpy()
        if (ordered != np.arange(len(ordered))).any():
            candidates, rows = candidates.iloc[ordered], rows[ordered]
        hexes = _Hex(table, rows)
        candidates["_sha"] = _codes(table["sha256"].iloc[rows])  # the payloads, numbered
        hashes = hexes.packed("hash")
        candidates["_group"] = _groups(candidates, hexes, hashes, p)
        facts = None
        if p.keep == "best" and evidence is not None:
            asked = keep.needs_evidence(candidates, candidates["_group"].to_numpy())
            if asked.any():
                facts = evidence(table.loc[candidates.index[asked]])
        _assign(table, candidates, hexes, hashes, keep.rank(candidates, p, sources, facts), p)
    counts = {
        "exact_duplicates": int((table["dup_reason"] == "exact").sum()),
        "near_duplicates": int(table["dup_reason"].str.startswith("near").sum()),
        "after_dedup": int(((table["status"] == "ok") & (table["dup_of"] == "")).sum()),
    }
    return DedupResult(table=table, counts=counts)


def _assign(
    table: pd.DataFrame,
    candidates: pd.DataFrame,
    hexes: _Hex,
    hashes: np.ndarray,
    ranking: keep.Ranking,
    p: DedupParams,
) -> None:
    """Write group, dup_of, dup_reason, dup_distance and keep_reason of the candidates
    (`hashes`: their packed hashes), from their ranking.

    Worked out on positions and numeric arrays: strings are read only for group members.
    """
    order, criteria = ranking.order, ranking.values
    n = len(order)
    group = candidates["_group"].to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, n])
    local = np.repeat(np.arange(len(starts)), sizes)  # each row's group, 0.. in order
    first = starts[local]  # where each row's kept row stands in `order`
    is_dup = np.arange(n) != first
    rep = order[first]  # each row's kept row, as a candidate position
    # Exact: byte-identical to a row ranked before it in the group.
    sha = candidates["_sha"].to_numpy()[order]
    key = local.astype(np.int64) * (int(sha.max()) + 1) + sha
    exact = np.ones(n, bool)
    exact[np.unique(key, return_index=True)[1]] = False
    dist = _popcounts(hashes[order], hashes[rep])
    reason = np.where(exact, "exact", "near").astype(object)
    members = np.flatnonzero(is_dup & ~exact)  # only a near member's reason can change
    extra = [(f"near_{name}", "transform_hashes", j) for j, name in enumerate(p.transforms)]
    extra += [("near_crop", "crop_hashes", j) for j in range(len(p.crops))]
    for label, column, j in extra:
        # The member's hash against the kept row's transformed or cropped hash; for a crop also
        # the other way round (the kept row a cropped copy of the member).
        mine, theirs = order[members], rep[members]
        d = _extra_distances(hexes.take("hash", mine), hexes.take(column, theirs), j)
        if column == "crop_hashes":
            d = np.minimum(d, _extra_distances(hexes.take("hash", theirs), hexes.take(column, mine), j))
        better = members[d < dist[members]]
        reason[better] = label
        dist[members] = np.minimum(dist[members], d)
    # The runner-up (the best other payload) decides why the kept row won; each member says
    # on what it lost to the kept row. Byte-identical copies of the kept row tie up to the key.
    other = np.flatnonzero(is_dup & (sha != sha[first]))
    runner = other[np.r_[True, local[other][1:] != local[other][:-1]]] if len(other) else other
    won = np.where(sizes > 1, "key", "").astype(object)
    if len(runner):
        won[local[runner]] = ranking.deciding(order[first[runner]], order[runner])
    dups = np.flatnonzero(is_dup)
    keep_reason = won[local]
    keep_reason[dups] = ranking.deciding(rep[dups], order[dups])
    # Groups are numbered in the order of their kept rows' keys.
    kept_keys = criteria["_key"].to_numpy()[order[starts]]
    number = np.empty(len(starts), np.int64)
    number[np.argsort(kept_keys, kind="stable")] = np.arange(len(starts))
    where = candidates.index[order]
    table.loc[where, "group"] = number[local]
    table.loc[where, "dup_of"] = np.where(is_dup, criteria["_key"].to_numpy()[rep], "")
    table.loc[where, "dup_reason"] = np.where(is_dup, reason, "")
    table.loc[where, "dup_distance"] = np.where(is_dup, dist, -1)
    table.loc[where, "keep_reason"] = keep_reason


def _extra_distances(hashes: list[str], extra: list[str], j: int) -> np.ndarray:
    """Distance of each hash to the j-th transformed or cropped hash of the same position (a
    large number where there is none)."""
    other = [c.split(",")[j] if c else "" for c in extra]
    has = np.array([bool(o) for o in other], bool)
    d = np.full(len(other), 1 << 30, np.int64)
    if has.any():
        d[has] = _distances([h for h, o in zip(hashes, other, strict=True) if o], [o for o in other if o])
    return d


REPORT_COLUMNS = [
    "group",
    "source",
    "id",
    "role",
    "dup_of",
    "dup_distance",
    "keep_reason",
    "format",
    "width",
    "height",
    "pixels",
    "colour",
    "lossless",
    "quality",
    "camera",
    "sha256",
    "hash",
]


def duplicate_groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per member of every group that has duplicates, the kept copy first: the
    report's duplicates.csv, with why the kept copy won and why each other member lost."""
    dup_groups = set(table.loc[table["dup_of"] != "", "group"])
    members = table[table["group"].isin(dup_groups)].copy()
    for column, default in _DEFAULTS.items():
        if column not in members:
            members[column] = default
    members["role"] = np.where(members["dup_of"] == "", "kept", members["dup_reason"])
    members["pixels"] = members["width"].astype(np.int64) * members["height"].astype(np.int64)
    members = members.sort_values(["group", "dup_of", "source", "id"], kind="stable")
    return members[REPORT_COLUMNS].reset_index(drop=True)


def near_groups_for_sheet(table: pd.DataFrame, limit: int, per_group: int = 10) -> list[pd.DataFrame]:
    """The largest groups that hold near duplicates, the kept copy first, then members by
    distance, at most ``per_group`` members each, for the contact sheet."""
    near = table[table["dup_reason"].str.startswith("near")]
    if near.empty or limit == 0:
        return []
    sizes = table[table["group"].isin(set(near["group"]))].groupby("group").size()
    chosen = sizes.sort_values(ascending=False, kind="stable").head(limit).index
    out = []
    for gid in chosen:
        members = table[table["group"] == gid].assign(_kept=lambda m: m["dup_of"] != "")
        ordered = members.sort_values(["_kept", "dup_distance", "source", "id"], kind="stable")
        out.append(ordered.drop(columns="_kept").head(per_group))
    return out
