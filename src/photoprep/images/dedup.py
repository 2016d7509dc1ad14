"""Duplicates: byte-identical payloads and perceptually near-identical images, one copy kept.

Pairs become groups (connected components): rows with the same sha256; rows whose hashes are
within `near_threshold` bits (optionally confirmed by the 256-bit fine hash,
`verify_threshold`); with `crops`, a row whose hash is within the threshold of another row's
cropped hash (what a copy of it cropped by that share of each side hashes to); and with
`transforms`, a row whose hash is within the threshold of another row's mirrored or rotated
hash. Every hash leaves out `margin` of each side of the picture (the probe's). Broken
payloads take no part: the validate stage reports each of them.

The fine hashes (256 bits) that a verification or a crop match reads are asked of a
`FineHashes` reader for the candidates it joins (the dedup stage's computes them then,
`photoprep.images.probe.fine_reader`); without one, they are the table's columns.

Which copy a group keeps (`dedup.keep`) is the keep rule's (`photoprep.images.keep`).
`keep_reason` says for the kept row which criterion made it win over the runner-up, and for
every other member which criterion it lost on (`keep.KEEP_REASONS`).

Counts are by pair, not by the copy kept: within a group, every row byte-identical to a row
ranked before it is ``exact``; the first row of each distinct payload other than the kept
one is ``near`` (or ``near_crop`` when a cropped hash of it or of the kept copy is closest,
``near_hflip``, ``near_rot90``, ... when the kept copy's transformed hash is). So
``exact_duplicates`` counts the redundant byte copies whatever is kept.

A table held in memory (`find_duplicates`) and one in a Parquet file (`find_duplicates_in_file`,
within ``compute.memory_mb``) go through the same steps and give the same table: what every
record keeps is numbers, and text is read only for the members of groups of two or more
(`photoprep.images.candidates` reads the records, in slices and partitions).

Why one module: the pairs, the groups, the keep rule's outcome and the reports share one
record layout (`_DEFAULTS`, `GROUPING_ONLY`) and one set of reasons; apart, each would need the
others' private rules to stay consistent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core import memory, tables
from photoprep.core.errors import UserError
from photoprep.core.params import DedupParams
from photoprep.images import candidates, graph, hamming, keep

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

_HEX = ("hash", *GROUPING_ONLY)
"""The hex hash columns: grouping reads them where they are (`candidates.Hex`), never copied whole."""

# What grouping (`_groups`), ranking (`keep.rank`) and `_assign` read of a record, besides `_HEX`
# and the sha256 (read once, to number the payloads: `_sha`).
_RANKED_COLUMNS: tuple[str, ...] = ("source", "id", "width", "height", "first_line")
_RANKED_COLUMNS += ("colour", "lossless", "quality", "camera", "format")


FineHashes = Callable[[pd.DataFrame], pd.DataFrame]
"""The `fine_hash` and `crop_fine_hashes` of the records given (all their columns), indexed
like them."""


@dataclass(frozen=True)
class _Fine:
    """The candidates' fine hashes: asked of `reader` for the candidates read, each once, or,
    without a reader, the records' own columns."""

    hexes: candidates.Hex
    reader: FineHashes | None
    known: dict[int, dict[str, str]] = field(default_factory=dict)  # candidate position: values

    def take(self, *asked: tuple[str, np.ndarray]) -> list[list[str]]:
        """The values of column `name` at candidate `positions`, for each (name, positions)
        asked; the reader is asked once, for the candidates not read before."""
        if self.reader is None:
            return [self.hexes.take(name, positions) for name, positions in asked]
        wanted = np.unique(np.concatenate([positions for _, positions in asked]))
        new = [int(at) for at in wanted if int(at) not in self.known]
        if new:
            records = self.hexes.records
            found = self.reader(records.take(records.columns, self.hexes.rows[new]))
            self.known.update(zip(new, found.to_dict("records"), strict=True))
        return [[self.known[int(at)][name] for at in positions] for name, positions in asked]


@dataclass
class DedupResult:
    table: pd.DataFrame  # every record, with group, dup_of, dup_reason, dup_distance, keep_reason
    counts: dict[str, int] = field(default_factory=dict)


def read_raw_tables(raw_dir: Path, sources: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """The download tables of the enabled sources (only `columns`, when given, with `source` and
    `id`), sorted by (source, id): the same rows at the same positions whatever the columns."""
    frames = []
    wanted = None if columns is None else list(dict.fromkeys(["source", "id", *columns]))
    for name in sources:
        path = Path(raw_dir) / f"{name}.parquet"
        if not path.exists():
            raise UserError(f"source '{name}': {path} not found (run the download@{name} stage)")
        frames.append(pd.read_parquet(path, columns=wanted))
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


def _near_edges(
    fine: _Fine, hashes: np.ndarray, p: DedupParams, memory_mb: int | None
) -> tuple[np.ndarray, np.ndarray]:
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
    hexes = fine.hexes
    crop_rows, cropped = _extra_hashes(hexes, "crop_hashes", len(p.crops))
    turn_rows, turned = _extra_hashes(hexes, "transform_hashes", len(p.transforms))
    sets = [s for s in (cropped, turned) if s is not None]
    others = np.concatenate(sets) if sets else None
    near = hamming.near_duplicate_pairs(hashes, p.near_threshold, others, memory_mb)
    first = _first_rows(near.inverse, len(near.unique))
    a = np.concatenate([np.arange(len(hashes)), first[near.pairs[:, 0]]])
    b = np.concatenate([first[near.inverse], first[near.pairs[:, 1]]])
    if p.verify_threshold is not None and len(a):
        joined = a != b  # a row and the first row of its own hash share it: only other pairs
        keep = np.ones(len(a), bool)
        keep[joined] = _distances(*fine.take(("fine_hash", a[joined]), ("fine_hash", b[joined]))) <= (
            p.verify_threshold
        )
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
        crop_a, b = a[is_crop], crop_rows[position]
        # A picture near its own cropped hash (most are, a crop of a few % moves a hash little)
        # joins nothing: its fine hashes are not asked for.
        other = crop_a != b
        crop_a, b, crop = crop_a[other], b[other], crop[other]
        fine_a, crop_fine = fine.take(("fine_hash", crop_a), ("crop_fine_hashes", b))
        seen = _distances(fine_a, [views.split(",")[j] for views, j in zip(crop_fine, crop, strict=True)])
        limit = min(CROP_FINE_THRESHOLD, 256 if p.verify_threshold is None else p.verify_threshold)
        src += [crop_a[seen <= limit], a[~is_crop]]
        dst += [b[seen <= limit], turn_rows[(entry[~is_crop] - n_cropped) % max(1, len(turn_rows))]]
    return np.concatenate(src), np.concatenate(dst)


def _extra_hashes(hexes: candidates.Hex, name: str, k: int) -> tuple[np.ndarray, np.ndarray | None]:
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


def _groups(
    payload: np.ndarray, fine: _Fine, hashes: np.ndarray, p: DedupParams, memory_mb: int | None
) -> np.ndarray:
    """Each candidate's group: components of the exact and near pairs (`payload`: the first
    candidate of each one's payload; `memory_mb`: the near search's budget, None: none)."""
    n = len(payload)
    # Byte-identical payloads: each row joins the first row that has its sha256.
    src, dst = [np.arange(n)], [payload]
    if p.near_threshold >= 0 and n:
        near_src, near_dst = _near_edges(fine, hashes, p, memory_mb)
        src.append(near_src)
        dst.append(near_dst)
    a, b = np.concatenate(src), np.concatenate(dst)
    joins = a != b  # most rows are their payload's and their hash's first: no edge to give
    return graph.components(n, a[joins], b[joins])


def find_duplicates(
    images: pd.DataFrame,
    p: DedupParams,
    sources: Sequence[str] | None = None,
    evidence: keep.Evidence | None = None,
    fine: FineHashes | None = None,
) -> DedupResult:
    """Group byte-identical and perceptually near-identical images; keep one per group.

    `images` has one row per record with `status`, `sha256`, `valid`, `hash`, `width`,
    `height`, and the probe's `colour`, `lossless`, `quality`, `camera`, `fine_hash`,
    `transform_hashes` (defaults when absent). `sources` orders sources for ``keep: first``.
    `evidence` gives the pixel facts of the keep rule (`photoprep.images.keep`) for the rows of
    `images` it is asked about: one per distinct payload of each group with two or more.
    `fine` gives the fine hashes of the rows a verification or a crop match reads (without it,
    the table's `fine_hash` and `crop_fine_hashes`).
    """
    table = images.copy(deep=False)  # copy-on-write: the caller's frame is never changed
    for column, default in _DEFAULTS.items():
        if column not in table:
            table[column] = default
    records = tables.InMemory(table)
    decided = _decide(records, p, sources, (evidence, fine), None)
    for column, values in decided.columns(0, len(table)).items():
        table[column] = values if column not in _TEXT else pd.array(values, dtype="str")
    return DedupResult(table=table, counts=decided.counts)


def find_duplicates_in_file(
    path: Path,
    out: Path,
    p: DedupParams,
    memory_mb: int,
    sources: Sequence[str] | None = None,
    evidence: keep.Evidence | None = None,
    leave_out: Sequence[str] = (),
    fine: FineHashes | None = None,
) -> dict[str, int]:
    """`find_duplicates` of the Parquet table at `path` (sorted by source and id), written to
    `out` with the same columns but `leave_out`; the counts. The table is never held whole: a
    slice of it holds an eighth of `memory_mb` (`SLICE_SHARE`), the sha256s' partitions a
    quarter, the near search's passes half, and what is held for every record is a few numbers
    (`_decide`). `evidence` and `fine` are `find_duplicates`'s."""
    slices = max(1, memory_mb // SLICE_SHARE)
    records = tables.InFile(path, slices)
    decided = _decide(records, p, sources, (evidence, fine), memory_mb)
    with tables.TableWriter(out) as writer:
        every = np.arange(records.n)
        for start, frame in records.pick(records.columns, every, tables.slice_rows(path, slices)):
            for column, default in _DEFAULTS.items():
                if column not in frame:
                    frame[column] = default
            for column, values in decided.columns(start, start + len(frame)).items():
                frame[column] = values if column not in _TEXT else pd.array(values, dtype="str")
            writer.write(frame.drop(columns=[c for c in leave_out if c in frame]).reset_index(drop=True))
    return decided.counts


_TEXT = ("dup_of", "dup_reason", "keep_reason")
SLICE_SHARE = 8  # a slice of a table in a file holds this share of `find_duplicates_in_file`'s budget


@dataclass
class _Decided:
    """What dedup decided, held as numbers for every record and as text only for the members of
    groups of two or more: `group` each record's group number (-1: not a candidate); `members`
    the table rows of the members (ascending), with `dup_of`, `reason`, `distance` and
    `keep_reason` of each."""

    group: np.ndarray
    members: np.ndarray
    dup_of: np.ndarray
    reason: np.ndarray
    distance: np.ndarray
    keep_reason: np.ndarray
    counts: dict[str, int]

    def columns(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The five columns dedup adds, for table rows start .. stop - 1."""
        lo, hi = np.searchsorted(self.members, [start, stop])
        at = self.members[lo:hi] - start
        out: dict[str, np.ndarray] = {"group": self.group[start:stop].copy()}
        for name, values, default in (
            ("dup_of", self.dup_of, ""),
            ("dup_reason", self.reason, ""),
            ("dup_distance", self.distance, -1),
            ("keep_reason", self.keep_reason, ""),
        ):
            column = np.full(stop - start, default, dtype=object if default == "" else np.int64)
            column[at] = values[lo:hi]
            out[name] = column
        return out


def _decide(
    records: tables.Rows,
    p: DedupParams,
    sources: Sequence[str] | None,
    readers: tuple[keep.Evidence | None, FineHashes | None],
    memory_mb: int | None,
) -> _Decided:
    """Groups, the copy each keeps, and why, for the records of `records` (`memory_mb`: the
    budget of the sha256s' partitions and the near search, None: no partitions; `readers`: the
    keep rule's evidence and the fine hashes, `find_duplicates`'s)."""
    evidence, fine = readers
    cands = candidates.candidates_of(records)
    rows = cands.rows
    if not len(rows):
        counts = {"exact_duplicates": 0, "near_duplicates": 0, "after_dedup": cands.ok}
        nothing = np.zeros(0, np.int64)
        text = np.zeros(0, object)
        return _Decided(np.full(records.n, -1, np.int64), nothing, text, text, nothing, text, counts)
    hexes = candidates.Hex(records, rows)
    payload = candidates.payloads(records, rows, None if memory_mb is None else memory_mb // 4)
    if memory_mb is not None:  # a budget: each step's peak on its own, not on the steps before
        memory.release()
    hashes = hexes.packed("hash")
    group = _groups(payload, _Fine(hexes, fine), hashes, p, None if memory_mb is None else memory_mb // 2)
    if memory_mb is not None:
        memory.release()
    members = np.flatnonzero(np.bincount(group)[group] > 1)
    frame = _ranked_frame(records, rows[members])
    frame["_group"] = group[members]
    frame["_sha"] = payload[members]
    facts = None
    if p.keep == "best" and evidence is not None and len(members):
        asked = keep.needs_evidence(frame, frame["_group"].to_numpy())
        if asked.any():
            facts = evidence(records.take(records.columns, rows[members[asked]]))
    ranking = keep.rank(frame, p, sources, facts)
    return _assign(records, cands, (payload, group, members), hexes, hashes, ranking, p)


def _ranked_frame(records: tables.Rows, rows: np.ndarray) -> pd.DataFrame:
    """What ranking reads of the records at `rows` (defaults where the table lacks a column)."""
    frame = records.take([c for c in _RANKED_COLUMNS if c in records.columns], rows)
    for column, default in _DEFAULTS.items():
        if column in _RANKED_COLUMNS:
            frame[column] = frame[column].fillna(default) if column in frame else default
    return frame


def _assign(
    records: tables.Rows,
    cands: candidates.Candidates,
    found: tuple[np.ndarray, np.ndarray, np.ndarray],
    hexes: candidates.Hex,
    hashes: np.ndarray,
    ranking: keep.Ranking,
    p: DedupParams,
) -> _Decided:
    """Group numbers of every candidate, and dup_of, dup_reason, dup_distance and keep_reason of
    the members of groups of two or more (`members`: their candidate positions; `ranking`:
    theirs, on positions in `members`). Worked out on positions and numeric arrays: strings
    are read only for members."""
    payload, group, members = found
    order = members[ranking.order]  # members best first within each group, as candidate positions
    m = len(order)
    mgroup = group[order]
    starts = np.flatnonzero(np.r_[True, mgroup[1:] != mgroup[:-1]]) if m else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, m])
    local = np.repeat(np.arange(len(starts)), sizes)  # each member's group, 0.. in order
    first = starts[local]  # where each member's kept row stands in `order`
    is_dup = np.arange(m) != first
    rep = order[first]  # each member's kept row, as a candidate position
    # Exact: byte-identical to a row ranked before it in the group.
    sha = payload[order]
    key = local.astype(np.int64) * (int(sha.max(initial=0)) + 1) + sha
    exact = np.ones(m, bool)
    exact[np.unique(key, return_index=True)[1]] = False
    dist = _popcounts(hashes[order], hashes[rep]) if m else np.zeros(0, np.int64)
    reason = np.where(exact, "exact", "near").astype(object)
    near_members = np.flatnonzero(is_dup & ~exact)  # only a near member's reason can change
    extra = [(f"near_{name}", "transform_hashes", j) for j, name in enumerate(p.transforms)]
    extra += [("near_crop", "crop_hashes", j) for j in range(len(p.crops))]
    for label, column, j in extra:
        # The member's hash against the kept row's transformed or cropped hash; for a crop also
        # the other way round (the kept row a cropped copy of the member).
        mine, theirs = order[near_members], rep[near_members]
        hash_mine, hash_theirs = hexes.take_each("hash", mine, theirs)
        extra_theirs, extra_mine = hexes.take_each(column, theirs, mine)
        d = _extra_distances(hash_mine, extra_theirs, j)
        if column == "crop_hashes":
            d = np.minimum(d, _extra_distances(hash_theirs, extra_mine, j))
        better = near_members[d < dist[near_members]]
        reason[better] = label
        dist[near_members] = np.minimum(dist[near_members], d)
    # The runner-up (the best other payload) decides why the kept row won; each member says
    # on what it lost to the kept row. Byte-identical copies of the kept row tie up to the key.
    other = np.flatnonzero(is_dup & (sha != sha[first]))
    runner = other[np.r_[True, local[other][1:] != local[other][:-1]]] if len(other) else other
    won = np.full(len(starts), "key", dtype=object)
    ranked = ranking.order  # positions in the ranking frame, in `order`'s order
    if len(runner):
        won[local[runner]] = ranking.deciding(ranked[first[runner]], ranked[runner])
    dups = np.flatnonzero(is_dup)
    keep_reason = won[local]
    keep_reason[dups] = ranking.deciding(ranked[first[dups]], ranked[dups])
    table_group = np.full(records.n, -1, np.int64)
    table_group[cands.rows] = _numbers(cands, group, order[starts])[group]
    # What members say, in table row order.
    keys = records.take(["source", "id"], cands.rows[rep[dups]])
    dup_of = np.full(m, "", dtype=object)
    dup_of[dups] = (keys["source"].astype(str) + "/" + keys["id"].astype(str)).to_numpy(dtype=object)
    where = cands.rows[order]
    by_row = np.argsort(where, kind="stable")
    counts = {
        "exact_duplicates": int((is_dup & exact).sum()),
        "near_duplicates": int((is_dup & ~exact).sum()),
        "after_dedup": cands.ok - len(dups),
    }
    return _Decided(
        group=table_group,
        members=where[by_row],
        dup_of=dup_of[by_row],
        reason=np.where(is_dup, reason, "")[by_row],
        distance=np.where(is_dup, dist, -1)[by_row],
        keep_reason=keep_reason[by_row],
        counts=counts,
    )


def _numbers(cands: candidates.Candidates, group: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Each group's number: groups in the order of their kept rows' keys (source/id), that is by
    the source's rank, then the key's place, then the group (`kept`: the kept candidate of each
    group of two or more; a group of one keeps its only row)."""
    kept_of_group = np.full(int(group.max(initial=-1)) + 1, -1, np.int64)
    kept_of_group[group] = np.arange(len(cands.rows))
    kept_of_group[group[kept]] = kept
    by_key = np.lexsort(
        (np.arange(len(kept_of_group)), cands.key_run[kept_of_group], cands.source_rank[kept_of_group])
    )
    number = np.empty(len(kept_of_group), np.int64)
    number[by_key] = np.arange(len(kept_of_group))
    return number


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


def members_of_groups_with_duplicates(path: Path, memory_mb: int) -> pd.DataFrame:
    """The records of the dedup table at `path` whose group holds duplicates (what
    `duplicate_groups` and `near_groups_for_sheet` read), read a slice at a time: every group of
    two or more holds members whose `dup_of` names the kept copy."""
    return tables.rows_in_groups(path, memory_mb, "group", "dup_of")


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
