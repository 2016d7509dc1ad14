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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core.errors import UserError
from photoprep.core.params import DedupParams
from photoprep.images import graph, hamming, keep

CROP_FINE_THRESHOLD = 56
"""A match through a cropped hash counts only when the fine hashes (256 bits) of the two views
are within this distance. On bench/dedup_quality.py's photographs the true crop matches were
at most 46 apart; the one false crop match of the demo (two different handwritten 3s, 4 bits
apart in the 64-bit hash) 70."""

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

# What grouping (`_groups`), ranking (`keep.rank`) and `_assign` read of a record.
_RANKED_COLUMNS = (
    "source",
    "id",
    "sha256",
    "hash",
    "width",
    "height",
    "first_line",
    *_DEFAULTS,
)


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


def _near_edges(candidates: pd.DataFrame, p: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs joined by near hashes, from one search:

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
    hashes, fine = list(candidates["hash"]), list(candidates["fine_hash"])
    crop_rows, cropped = _extra_hashes(candidates["crop_hashes"], len(p.crops))
    turn_rows, turned = _extra_hashes(candidates["transform_hashes"], len(p.transforms))
    sets = [s for s in (cropped, turned) if s is not None]
    others = np.concatenate(sets) if sets else None
    near = hamming.near_duplicate_pairs(hamming.pack_hashes(hashes), p.near_threshold, others)
    first = _first_rows(near.inverse, len(near.unique))
    a = np.concatenate([np.arange(len(hashes)), first[near.pairs[:, 0]]])
    b = np.concatenate([first[near.inverse], first[near.pairs[:, 1]]])
    if p.verify_threshold is not None and len(a):
        keep = _distances([fine[i] for i in a], [fine[i] for i in b]) <= p.verify_threshold
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
        crop_fine = candidates["crop_fine_hashes"]
        seen = _distances(
            [fine[i] for i in a[is_crop]],
            [crop_fine.iat[i].split(",")[j] for i, j in zip(b, crop, strict=True)],
        )
        limit = min(CROP_FINE_THRESHOLD, 256 if p.verify_threshold is None else p.verify_threshold)
        src += [a[is_crop][seen <= limit], a[~is_crop]]
        dst += [b[seen <= limit], turn_rows[(entry[~is_crop] - n_cropped) % max(1, len(turn_rows))]]
    return np.concatenate(src), np.concatenate(dst)


def _extra_hashes(column: pd.Series, k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows that have k comma-separated hashes in `column` (cropped or transformed), and
    those hashes packed one kind after another (every row's first, then every row's second,
    ...); (empty, None) when k is 0 or no row has them."""
    if k == 0:
        return np.zeros(0, np.int64), None
    text = column.to_numpy()
    commas = column.str.count(",").to_numpy()
    rows = np.flatnonzero((column.str.len().to_numpy() > 0) & (commas == k - 1))
    if not len(rows):
        return rows, None
    packed = hamming.pack_hashes(",".join(text[rows]).split(","))  # row by row, k a row
    others = packed.reshape(len(rows), k, -1).transpose(1, 0, 2).reshape(len(rows) * k, -1)
    return rows, np.ascontiguousarray(others)


def _groups(candidates: pd.DataFrame, p: DedupParams) -> np.ndarray:
    n = len(candidates)
    rows = np.arange(n)
    # Byte-identical payloads: each row joins the first row that has its sha256.
    first_of_sha = candidates.groupby("sha256", sort=False).cumcount().to_numpy() == 0
    sha_first = pd.Series(rows[first_of_sha], index=candidates["sha256"].to_numpy()[first_of_sha])
    src, dst = [rows], [sha_first.loc[candidates["sha256"]].to_numpy()]
    if p.near_threshold >= 0 and n:
        near_src, near_dst = _near_edges(candidates, p)
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
    # Only the columns grouping and ranking read: the working copies stay narrow however wide
    # the download table is.
    used = [c for c in _RANKED_COLUMNS if c in table.columns]
    candidates = table.loc[is_candidate, used].copy()
    for column, default in _DEFAULTS.items():
        candidates[column] = candidates[column].fillna(default)
    if len(candidates):
        candidates = candidates.sort_values(["source", "id"], kind="stable")
        candidates["_group"] = _groups(candidates, p)
        facts = None
        if p.keep == "best" and evidence is not None:
            asked = keep.needs_evidence(candidates, candidates["_group"].to_numpy())
            if asked.any():
                facts = evidence(table.loc[candidates.index[asked]])
        order, criteria = keep.rank(candidates, p, sources, facts)
        _assign(table, order, criteria, p)
    counts = {
        "exact_duplicates": int((table["dup_reason"] == "exact").sum()),
        "near_duplicates": int(table["dup_reason"].str.startswith("near").sum()),
        "after_dedup": int(((table["status"] == "ok") & (table["dup_of"] == "")).sum()),
    }
    return DedupResult(table=table, counts=counts)


def _assign(
    table: pd.DataFrame, order: pd.DataFrame, criteria: list[tuple[str, str]], p: DedupParams
) -> None:
    """Write group, dup_of, dup_reason, dup_distance and keep_reason of the ranked rows."""
    rank = order.groupby("_group").cumcount().to_numpy()
    kept = order[rank == 0].set_index("_group")
    reps = kept.loc[order["_group"]]
    is_dup = rank > 0
    # Exact: byte-identical to a row ranked before it in the group.
    exact = order.duplicated(["_group", "sha256"]).to_numpy()
    dist = _distances(list(order["hash"]), list(reps["hash"]))
    reason = np.where(exact, "exact", "near").astype(object)
    members = np.flatnonzero(is_dup & ~exact)  # only a near member's reason can change
    extra = [(f"near_{name}", "transform_hashes", j) for j, name in enumerate(p.transforms)]
    extra += [("near_crop", "crop_hashes", j) for j in range(len(p.crops))]
    for label, column, j in extra:
        # The member's hash against the kept row's transformed or cropped hash; for a crop also
        # the other way round (the kept row a cropped copy of the member).
        d = _extra_distances(order["hash"].iloc[members], reps[column].iloc[members], j)
        if column == "crop_hashes":
            d = np.minimum(d, _extra_distances(reps["hash"].iloc[members], order[column].iloc[members], j))
        better = members[d < dist[members]]
        reason[better] = label
        dist[members] = np.minimum(dist[members], d)
    # The runner-up (the best other payload) decides why the kept row won; each member says
    # on what it lost to the kept row. Byte-identical copies of the kept row tie up to the key.
    others = order[is_dup & (order["sha256"].to_numpy() != reps["sha256"].to_numpy())]
    runner = others.groupby("_group").head(1).set_index("_group")
    sizes = order.groupby("_group").size().loc[kept.index]
    won = pd.Series(np.where(sizes > 1, "key", ""), index=kept.index, dtype=object)
    if len(runner):
        won.loc[runner.index] = keep.deciding(kept.loc[runner.index], runner, criteria)
    lost = keep.deciding(reps.reset_index(drop=True), order.reset_index(drop=True), criteria)
    keep_reason = np.where(is_dup, lost, won.loc[order["_group"]].to_numpy())
    group_ids = pd.Series(np.arange(len(kept)), index=kept.sort_values("_key").index)
    table.loc[order.index, "group"] = group_ids.loc[order["_group"]].to_numpy()
    table.loc[order.index, "dup_of"] = np.where(is_dup, reps["_key"].to_numpy(), "")
    table.loc[order.index, "dup_reason"] = np.where(is_dup, reason, "")
    table.loc[order.index, "dup_distance"] = np.where(is_dup, dist, -1)
    table.loc[order.index, "keep_reason"] = keep_reason


def _extra_distances(hashes: pd.Series, extra: pd.Series, j: int) -> np.ndarray:
    """Distance of each hash to the j-th transformed or cropped hash of the same position (a
    large number where there is none)."""
    other = [c.split(",")[j] if c else "" for c in extra]
    has = np.array([bool(o) for o in other], bool)
    d = np.full(len(other), 1 << 30, np.int64)
    if has.any():
        d[has] = _distances(list(hashes.to_numpy()[has]), [o for o in other if o])
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
