"""Duplicates: repeated ids, byte-identical payloads and perceptually near-identical images.

Pairs become groups (connected components); each group keeps one representative, the one
with the most pixels, then the smallest (source, id) key. Everything else points at it with
`dup_of` and a reason. Broken payloads take no part: the validate stage reports each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from photoprep.errors import UserError
from photoprep.images import hamming
from photoprep.params import DedupParams


@dataclass
class DedupResult:
    table: pd.DataFrame  # every record, with group, dup_of, dup_reason, dup_distance
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


def _key(table: pd.DataFrame) -> pd.Series:
    return table["source"] + "/" + table["id"]


def _edges(candidates: pd.DataFrame, p: DedupParams) -> tuple[np.ndarray, np.ndarray, int]:
    """Graph edges over candidate rows (0..n-1) plus one node per distinct hash (n..n+u-1)."""
    n = len(candidates)
    rows = np.arange(n)
    # Byte-identical payloads: each row joins the first row that has its sha256.
    first_of_sha = candidates.groupby("sha256", sort=False).cumcount().to_numpy() == 0
    sha_first = pd.Series(rows[first_of_sha], index=candidates["sha256"].to_numpy()[first_of_sha])
    src, dst = [rows], [sha_first.loc[candidates["sha256"]].to_numpy()]
    extra = 0
    if p.near_threshold >= 0 and n:
        near = hamming.near_duplicate_pairs(hamming.pack_hashes(list(candidates["hash"])), p.near_threshold)
        extra = len(near.unique)
        # Each row joins the node of its hash value; near hash values join each other.
        src += [rows, near.pairs[:, 0] + n]
        dst += [near.inverse + n, near.pairs[:, 1] + n]
    return np.concatenate(src), np.concatenate(dst), n + extra


def _groups(candidates: pd.DataFrame, p: DedupParams) -> np.ndarray:
    src, dst, nodes = _edges(candidates, p)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    return labels[: len(candidates)]


def _distances(a: list[str], b: list[str]) -> np.ndarray:
    if not a:
        return np.zeros(0, np.int64)
    x, y = hamming.pack_hashes(a), hamming.pack_hashes(b)
    return np.unpackbits(np.bitwise_xor(x, y), axis=1).sum(axis=1).astype(np.int64)


def find_duplicates(images: pd.DataFrame, p: DedupParams) -> DedupResult:
    """Group byte-identical and perceptually near-identical images; keep one per group.

    `images` has one row per record with `status`, `sha256`, `valid`, `hash`, `width`, `height`.
    """
    table = images.copy()
    table["group"] = -1
    table["dup_of"] = ""
    table["dup_reason"] = ""
    table["dup_distance"] = -1
    is_candidate = (table["status"] == "ok") & table["valid"].fillna(False).astype(bool)
    candidates = table[is_candidate]
    if len(candidates):
        order = candidates.assign(
            _group=_groups(candidates, p),
            _pixels=-(candidates["width"].astype(np.int64) * candidates["height"].astype(np.int64)),
            _key=_key(candidates),
        ).sort_values(["_group", "_pixels", "_key"], kind="stable")
        first = order.groupby("_group")["_key"].transform("first")
        rep_index = order.groupby("_group").head(1).set_index("_group")
        reps = rep_index.loc[order["_group"]]
        is_dup = (order["_key"] != first).to_numpy()
        same_bytes = order["sha256"].to_numpy() == reps["sha256"].to_numpy()
        dist = _distances(list(order["hash"]), list(reps["hash"]))
        # Group ids are renumbered by their representative's key, so they do not depend on input order.
        group_ids = pd.Series(np.arange(len(rep_index)), index=rep_index.sort_values("_key").index)
        table.loc[order.index, "group"] = group_ids.loc[order["_group"]].to_numpy()
        table.loc[order.index, "dup_of"] = np.where(is_dup, first, "")
        table.loc[order.index, "dup_reason"] = np.where(is_dup, np.where(same_bytes, "exact", "near"), "")
        table.loc[order.index, "dup_distance"] = np.where(is_dup, dist, -1)
    counts = {
        "exact_duplicates": int((table["dup_reason"] == "exact").sum()),
        "near_duplicates": int((table["dup_reason"] == "near").sum()),
        "after_dedup": int(((table["status"] == "ok") & (table["dup_of"] == "")).sum()),
    }
    return DedupResult(table=table, counts=counts)


def duplicate_groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per member of every group that has duplicates: the report's duplicates.csv."""
    dup_groups = set(table.loc[table["dup_of"] != "", "group"])
    members = table[table["group"].isin(dup_groups)].copy()
    members["role"] = np.where(members["dup_of"] == "", "kept", members["dup_reason"])
    members["pixels"] = members["width"].astype(np.int64) * members["height"].astype(np.int64)
    members = members.sort_values(["group", "dup_of", "source", "id"], kind="stable")
    columns = [
        "group",
        "source",
        "id",
        "role",
        "dup_of",
        "dup_distance",
        "sha256",
        "hash",
        "width",
        "height",
        "pixels",
    ]
    return members[columns].reset_index(drop=True)


def near_groups_for_sheet(table: pd.DataFrame, limit: int, per_group: int = 10) -> list[pd.DataFrame]:
    """The largest groups that hold near duplicates, representative first, at most ``per_group``
    members each, for the contact sheet."""
    near = table[table["dup_reason"] == "near"]
    if near.empty or limit == 0:
        return []
    sizes = table[table["group"].isin(set(near["group"]))].groupby("group").size()
    chosen = sizes.sort_values(ascending=False, kind="stable").head(limit).index
    out = []
    for gid in chosen:
        members = table[table["group"] == gid]
        ordered = members.sort_values(["dup_distance", "source", "id"], kind="stable")
        out.append(ordered.head(per_group))
    return out
