"""The status row of one record: its fields, defined once, and the tables made of such rows.

Every record a download sees ends as one row: ``status`` ok or failed, with a ``reason``
such as ``http_404`` when it failed (a failed fetch is data, not an exception), the answer's
``http_status``, the ``attempts`` made, and for a stored body its ``sha256``, ``size``,
sniffed ``mime`` and where the store put it (``shard``, ``offset``). `FetchRow` is that row;
the table's result columns (`RESULT_COLUMNS`), the journal's fields (`JOURNAL_FIELDS`: the
row before the store has placed its body) and the rows an earlier run left (`earlier_rows`)
all follow from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd

from photoprep.ingest.sniff import sniff_mime

KEY = ("source", "id")


@dataclass(slots=True)
class FetchRow:
    """The result columns of one record; `shard` and `offset` are known once the body is stored."""

    status: str
    reason: str
    http_status: int
    attempts: int
    sha256: str = ""
    size: int = 0
    mime: str = ""
    shard: str = ""
    offset: int = 0

    @classmethod
    def stored(cls, body: bytes, http_status: int, attempts: int) -> FetchRow:
        """The row of a body that came back: hashed (sha256) and sniffed."""
        sha256 = hashlib.sha256(body).hexdigest()
        return cls("ok", "", http_status, attempts, sha256, len(body), sniff_mime(body))

    @classmethod
    def failed(cls, reason: str, http_status: int = 0, attempts: int = 0) -> FetchRow:
        return cls("failed", reason, http_status, attempts)

    @classmethod
    def from_mapping(cls, row: Any) -> FetchRow:
        """The row of a mapping that holds `JOURNAL_FIELDS` (a journal line, a table row)."""
        values: dict[str, Any] = {name: _TYPES[name](row[name]) for name in _UNPLACED}
        return cls(**values)


RESULT_COLUMNS = tuple(f.name for f in fields(FetchRow))
"""The columns a download adds to the records, in table order."""
_TYPES = {f.name: int if f.type == "int" else str for f in fields(FetchRow)}
INT_COLUMNS = tuple(name for name in RESULT_COLUMNS if _TYPES[name] is int)
_PLACED = ("shard", "offset")  # set by the store when the run ends
_UNPLACED = tuple(name for name in RESULT_COLUMNS if name not in _PLACED)
JOURNAL_FIELDS = (*KEY, "url", *_UNPLACED)
"""What the journal holds of a committed row: its record's key and url, and the row unplaced."""


def journal_values(key: tuple[str, str, str], row: FetchRow) -> tuple[Any, ...]:
    """The values of `JOURNAL_FIELDS` for the (source, id, url) `key` and its row."""
    return (*key, *(getattr(row, name) for name in _UNPLACED))


def earlier_rows(previous: pd.DataFrame | None, journal_rows: dict[tuple[str, str], Any]) -> dict:
    """The ok rows of the last finished table by (source, id), overridden by those an interrupted
    run committed since (each a mapping of `JOURNAL_FIELDS`)."""
    earlier: dict[tuple[str, str], Any] = {}
    if previous is not None and not previous.empty and set(JOURNAL_FIELDS) <= set(previous.columns):
        ok = previous[previous["status"] == "ok"]
        for values in zip(*(ok[c] for c in JOURNAL_FIELDS), strict=True):
            row = dict(zip(JOURNAL_FIELDS, values, strict=True))
            earlier[(row["source"], row["id"])] = row
    earlier.update(journal_rows)
    return earlier


def check_records(records: pd.DataFrame) -> None:
    """Records need `source`, `id`, `url`, and none of the result columns yet."""
    missing = [c for c in (*KEY, "url") if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    clash = [c for c in RESULT_COLUMNS if c in records.columns]
    if clash:
        raise ValueError(f"records already have result column(s) {clash}")


def table_of(records: pd.DataFrame, rows: list[FetchRow]) -> pd.DataFrame:
    """Records with their result columns: key first, carried columns, results; in the records'
    order, which is the key's (`photoprep.ingest.fetch.download` sorts them before anything else).
    The records' columns are not copied (pandas copies on write)."""
    carried = [c for c in records.columns if c not in KEY]
    table = records[[*KEY, *carried]].reset_index(drop=True)
    for column in RESULT_COLUMNS:
        values = [getattr(row, column) for row in rows]
        table[column] = pd.Series(values, dtype="int64" if column in INT_COLUMNS else None)
    return table
