"""The records that take part in dedup, read where their table is: in memory, or in a Parquet
file a slice at a time (`photoprep.core.tables.Rows`).

- `candidates_of`: the fetched and valid records in (source, id) order, with what numbers the
  groups later (each one's source rank among the ``name/`` texts, and its key's first place);
- `payloads`: each candidate's payload as the number of the first candidate with its sha256,
  grouped one hash partition of the sha256s at a time within a memory budget;
- `Hex`: the candidates' hex hash columns, packed or taken a slice at a time.

Kept apart from `photoprep.images.dedup`, which decides the groups and the copy each keeps from
these numbers: reading a table in slices and partitions is one job, the keep rule another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from photoprep.core import tables
from photoprep.images import hamming

PACK_ROWS = 1 << 16  # hex hashes made Python strings at once while packing them


@dataclass(frozen=True)
class Hex:
    """The candidates' hex hash columns, read where the table is (`records`): `rows` are the
    table rows of the candidates, in candidate order. Only the values asked for become Python
    strings, a slice at a time."""

    records: tables.Rows
    rows: np.ndarray

    def _values(self, frame: pd.DataFrame, name: str) -> pd.Series:
        default = ""  # a hash a record lacks
        if name not in frame:
            return pd.Series(default, index=frame.index, dtype=str)
        return frame[name].fillna(default)

    def take(self, name: str, positions: np.ndarray) -> list[str]:
        """The values of the candidates at `positions`."""
        return self.take_each(name, positions)[0]

    def take_each(self, name: str, *positions: np.ndarray) -> list[list[str]]:
        """The values of the candidates at each of `positions`, read in one pass (a pass over a
        file's column for each would read it as many times)."""
        columns = [name] if name in self.records.columns else []
        wanted = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        values = self._values(self.records.take(columns, self.rows[wanted]), name).tolist()
        cuts = np.cumsum([len(at) for at in positions])[:-1]
        return [values[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)], strict=True)]

    def slices(self, name: str) -> Iterator[tuple[int, pd.Series]]:
        """(first candidate position, values) of `PACK_ROWS` candidates at a time."""
        columns = [name] if name in self.records.columns else []
        for start, frame in self.records.pick(columns, self.rows, PACK_ROWS):
            yield start, self._values(frame, name)

    def packed(self, name: str) -> np.ndarray:
        """Every candidate's hash packed (N x B bytes)."""
        parts = [hamming.pack_hashes(values.tolist()) for _, values in self.slices(name)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.uint8)


@dataclass(frozen=True)
class Candidates:
    """The records that take part (fetched and valid), in (source, id) order: `rows` their table
    rows; `source_rank` the rank of each one's source among the sources' ``name/`` texts (the
    order of the keys ``source/id``); `key_run` the first candidate with the same (source, id);
    `ok` the records fetched, candidates or not."""

    rows: np.ndarray
    source_rank: np.ndarray
    key_run: np.ndarray
    ok: int


def candidates_of(records: tables.Rows) -> Candidates:
    """The candidates (fetched and valid) in (source, id) order: read a slice at a time; a table
    held in memory is sorted when it is not in that order, a file must be."""
    found, ok = [], 0
    for start, frame in records.pick(["status", "valid"], np.arange(records.n), PACK_ROWS):
        fetched = (frame["status"] == "ok").to_numpy()
        ok += int(fetched.sum())
        found.append(start + np.flatnonzero(fetched & frame["valid"].fillna(False).astype(bool).to_numpy()))
    rows = np.concatenate(found) if found else np.zeros(0, np.int64)
    keys = _key_order(records, rows)
    if keys is None:  # not in (source, id) order: a frame in memory is sorted (a file is refused)
        if isinstance(records, tables.InFile):
            raise ValueError(f"{records.path}: the table is not sorted by source and id")
        by = ["source", "id"]
        order = records.take(by, rows).reset_index(drop=True).sort_values(by, kind="stable").index.to_numpy()
        rows = rows[order]
        keys = _key_order(records, rows)
        assert keys is not None
    return Candidates(rows=rows, source_rank=keys[0], key_run=keys[1], ok=ok)


def _key_order(records: tables.Rows, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(source rank, key run) of the records at `rows` (`Candidates`); None when they are not in
    (source, id) order. Only sources become Python strings (a few), never ids."""
    codes: dict[str, int] = {}
    source_code = np.zeros(len(rows), np.int64)
    key_run = np.arange(len(rows), dtype=np.int64)
    last: tuple[pa.Array, pa.Array] | None = None
    for start, frame in records.pick(["source", "id"], rows, PACK_ROWS):
        source, ids = _text(frame["source"]), _text(frame["id"])
        if last is not None:
            source, ids = pa.concat_arrays([last[0], source]), pa.concat_arrays([last[1], ids])
        same_source = pc.equal(source[1:], source[:-1])
        ascending = pc.or_(
            pc.less(source[:-1], source[1:]), pc.and_(same_source, pc.less_equal(ids[:-1], ids[1:]))
        )
        if not pc.all(ascending).as_py() and len(ascending):
            return None
        same = pc.and_(same_source, pc.equal(ids[:-1], ids[1:])).to_numpy(zero_copy_only=False)
        local, names = pd.factorize(frame["source"].astype(str))
        numbers = np.array([codes.setdefault(str(name), len(codes)) for name in names], np.int64)
        source_code[start : start + len(frame)] = numbers[local]
        offset = 1 if last is not None else 0
        runs = key_run[start - offset : start + len(frame)]
        for k in np.flatnonzero(same):  # a key twice: rare (a record once per key), so by steps
            runs[k + 1] = runs[k]
        last = (source.slice(len(source) - 1), ids.slice(len(ids) - 1))
    order = sorted(codes, key=lambda name: name + "/")
    rank = np.zeros(len(codes), np.int64)
    rank[[codes[name] for name in order]] = np.arange(len(order))
    return rank[source_code] if len(codes) else source_code, key_run


def _text(values: pd.Series) -> pa.Array:
    """A column as one Arrow array of large strings (a slice of a file's table may come in chunks)."""
    array = pa.array(values.astype(str), from_pandas=True)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.cast(pa.large_string())


def payloads(records: tables.Rows, rows: np.ndarray, memory_mb: int | None) -> np.ndarray:
    """Each candidate's payload, numbered by its first candidate: equal sha256, equal number.

    One hash partition of the sha256s at a time (by their first hex digit pair), as many as
    keep one within `memory_mb` (None: one). A partition's digests are packed to 32 bytes and
    grouped by a sort of their words; texts that are not all 64 hex digits (a hand-made table)
    are grouped by Arrow's hash kernel instead, which holds several times the bytes."""
    n = len(rows)
    payload = np.arange(n, dtype=np.int64)
    parts = 1 if memory_mb is None else max(1, min(256, -(-n * _SHA_BYTES // max(1, memory_mb << 20))))
    for part in range(parts):
        positions: list[np.ndarray] = []
        digests: list[np.ndarray] = []
        texts: list[pa.Array] = []
        for start, frame in records.pick(["sha256"], rows, PACK_ROWS):
            sha = _text(frame["sha256"])
            packed = _packed_digests(sha)
            first_byte = packed[:, 0] if packed is not None else _first_byte(sha)
            mine = first_byte.astype(np.int64) % parts == part if parts > 1 else np.ones(len(sha), bool)
            positions.append(start + np.flatnonzero(mine))
            if packed is not None and not texts:
                digests.append(packed[mine])
            else:  # a text that is no digest: this partition is grouped as texts
                texts += [_hex_texts(d) for d in digests]
                texts.append(sha.filter(pa.array(mine)) if packed is None else _hex_texts(packed[mine]))
                digests = []
        at = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        if not len(at):
            continue
        if texts:
            codes = pa.concat_arrays(texts).dictionary_encode(null_encoding="encode").indices
            codes = codes.to_numpy().astype(np.int64)
            first = np.full(int(codes.max()) + 1, n, np.int64)
            np.minimum.at(first, codes, at)
            payload[at] = first[codes]
            continue
        words = np.concatenate(digests).view(">u8").astype(np.uint64)  # 4 words a digest
        del digests
        order = np.lexsort(words.T[::-1])  # stable: equal digests keep their candidate order
        words = words[order]
        new = np.r_[True, (words[1:] != words[:-1]).any(axis=1)]
        del words
        firsts = at[order][new]  # the first candidate of each payload
        payload[at[order]] = firsts[np.cumsum(new) - 1]
    return payload


_SHA_BYTES = 120  # bytes a sha256 takes while its partition is grouped (packed, its words, sorted)


def _packed_digests(sha: pa.Array) -> np.ndarray | None:
    """The texts of `sha`, each 64 lower-case hex digits (a sha256 as photoprep writes it), as
    N x 32 bytes (equal texts, equal bytes); None when one is not such a text."""
    if not len(sha):
        return np.zeros((0, 32), np.uint8)
    if sha.null_count or not pc.all(pc.match_substring_regex(sha, "^[0-9a-f]{64}$")).as_py():
        return None
    offsets = np.frombuffer(sha.buffers()[1], np.int64, len(sha) + 1, sha.offset * 8)
    text = memoryview(sha.buffers()[2])[offsets[0] : offsets[-1]]
    return np.frombuffer(bytes.fromhex(str(text, "ascii")), np.uint8).reshape(len(sha), 32)


def _first_byte(sha: pa.Array) -> np.ndarray:
    """The partition byte of texts that are no digests: their first two characters as a
    lower-case hex number (a digest's first byte, as `_packed_digests` has it), else 0."""
    prefixes = pa.array([f"{i:02x}" for i in range(256)], pa.large_string())
    return pc.index_in(pc.utf8_slice_codeunits(sha, 0, 2), value_set=prefixes).fill_null(0).to_numpy()


def _hex_texts(packed: np.ndarray) -> pa.Array:
    """Packed digests back as their 64 hex digits."""
    return pa.array([row.tobytes().hex() for row in packed], pa.large_string())
