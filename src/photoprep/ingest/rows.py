"""The status row of one record: its fields, defined once, and the columns and tables of such rows.

Every record a download sees ends as one row: ``status`` ok or failed, with a ``reason``
such as ``http_404`` when it failed (a failed fetch is data, not an exception), the answer's
``http_status``, the ``attempts`` made, and for a stored body its ``sha256``, ``size``,
sniffed ``mime`` and where the store put it (``shard``, ``offset``). `FetchRow` is that row as
one fetch hands it over; `Results` holds the rows of a whole run as columns (a record a
position), where a `FetchRow` each held some 300 bytes of Python objects a photo for the whole
run. The table's result columns (`RESULT_COLUMNS`), the journal's fields (`JOURNAL_FIELDS`: the
row before the store has placed its body) and the rows an earlier run left (`earlier_frame`)
all follow from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from photoprep.ingest.blobindex import BlobIndex
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


RESULT_COLUMNS = tuple(f.name for f in fields(FetchRow))
"""The columns a download adds to the records, in table order."""
INT_COLUMNS = tuple(f.name for f in fields(FetchRow) if f.type == "int")
_CODED = ("status", "reason", "mime", "shard")  # few distinct texts: a code a row
_DTYPES: dict[str, Any] = {"sha256": "S64", **dict.fromkeys(_CODED, np.int32)}
_PLACED = ("shard", "offset")  # set by the store when the run ends
_UNPLACED = tuple(name for name in RESULT_COLUMNS if name not in _PLACED)
JOURNAL_FIELDS = (*KEY, "url", *_UNPLACED)
"""What the journal holds of a committed row: its record's key and url, and the row unplaced."""


def journal_values(key: tuple[str, str, str], row: FetchRow) -> tuple[Any, ...]:
    """The values of `JOURNAL_FIELDS` for the (source, id, url) `key` and its row."""
    return (*key, *(getattr(row, name) for name in _UNPLACED))


class _Texts:
    """The distinct texts of a column and the code of each (0: '', a row with no text)."""

    def __init__(self) -> None:
        self.texts: list[str] = [""]
        self.codes: dict[str, int] = {"": 0}

    def code(self, text: str) -> int:
        found = self.codes.get(text)
        if found is None:
            found = self.codes[text] = len(self.texts)
            self.texts.append(text)
        return found

    def codes_of(self, values: pd.Series) -> np.ndarray:
        """The code of each text of `values` (one lookup per distinct text)."""
        codes, uniques = pd.factorize(values)
        return np.asarray([self.code(str(text)) for text in uniques], dtype=np.int32)[codes]


class Results:
    """The result columns of `n` rows, a numpy array each: ints as they are, sha256 as 64 ASCII
    bytes, and the few distinct texts of status, reason, mime and shard as codes. A row is
    ``status`` '' until it is recorded (`record`, `fill`). Rows `take`n share the codes."""

    def __init__(self, n: int, texts: dict[str, _Texts] | None = None) -> None:
        self.texts = texts if texts is not None else {name: _Texts() for name in _CODED}
        self.columns = {name: np.zeros(n, _DTYPES.get(name, np.int64)) for name in RESULT_COLUMNS}

    def __len__(self) -> int:
        return len(self.columns["status"])

    def record(self, position: int, row: FetchRow) -> None:
        for name, column in self.columns.items():
            value = getattr(row, name)
            column[position] = self.texts[name].code(value) if name in _CODED else value

    def row(self, position: int) -> FetchRow:
        values = {name: self._value(name, position) for name in RESULT_COLUMNS}
        return FetchRow(**values)

    def _value(self, name: str, position: int) -> Any:
        value = self.columns[name][position]
        if name in _CODED:
            return self.texts[name].texts[value]
        return value.decode("ascii") if name == "sha256" else int(value)

    def ok(self, positions: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Whether each row of `positions` is ok."""
        return self.columns["status"][positions] == self.texts["status"].code("ok")

    def fill(self, positions: np.ndarray, frame: pd.DataFrame) -> None:
        """Record at `positions` the rows of `frame` (a column each of `JOURNAL_FIELDS`' results)."""
        for name in _UNPLACED:
            values = frame[name]
            column = self.columns[name]
            if name in _CODED:
                column[positions] = self.texts[name].codes_of(values)
            elif name == "sha256":
                column[positions] = np.asarray(values.to_numpy(dtype=object), dtype="S64")
            else:
                column[positions] = values.to_numpy(dtype=np.int64)

    def place(self, index: BlobIndex) -> None:
        """Set `shard` and `offset` of every ok row from the store's `index`, in one search."""
        ok = np.flatnonzero(self.ok())
        codes, offsets = index.locate(self.columns["sha256"][ok])
        names = self.texts["shard"]
        shard_of = np.asarray([names.code(name) for name in index.names], np.int32)
        self.columns["shard"][ok] = shard_of[codes]
        self.columns["offset"][ok] = offsets

    def take(self, positions: np.ndarray) -> Results:
        taken = Results(0, self.texts)
        taken.columns = {name: column[positions] for name, column in self.columns.items()}
        return taken

    def table(self, records: pd.DataFrame) -> pd.DataFrame:
        """`records` (a row each, in order) with the result columns: key first, carried columns,
        results. The records' columns are not copied (pandas copies on write)."""
        carried = [c for c in records.columns if c not in KEY]
        table = records[[*KEY, *carried]].reset_index(drop=True)
        for name, column in self.columns.items():
            if name in _CODED:
                table[name] = pd.Series(np.asarray(self.texts[name].texts, dtype=object)[column])
            elif name == "sha256" and len(column):
                # Through Arrow: no Python string a row on the way.
                table[name] = pa.array(column).cast(pa.string()).to_pandas()
            elif name == "sha256":
                table[name] = pd.Series([], dtype=object)
            else:
                table[name] = column
        return table


def earlier_frame(previous: pd.DataFrame | None, journal_rows: Mapping[tuple[str, str], Any]) -> pd.DataFrame:
    """The ok rows of the last finished table (each a row of `JOURNAL_FIELDS`), overridden by
    those an interrupted run committed since, which have ``journal`` True."""
    frames = []
    if previous is not None and not previous.empty and set(JOURNAL_FIELDS) <= set(previous.columns):
        ok = previous.loc[previous["status"] == "ok", list(JOURNAL_FIELDS)]
        frames.append(ok.assign(journal=False))
    if journal_rows:
        committed = pd.DataFrame(list(journal_rows.values()), columns=list(JOURNAL_FIELDS))
        frames.append(committed.assign(journal=True))
    if not frames:
        return pd.DataFrame(columns=[*JOURNAL_FIELDS, "journal"])
    earlier = pd.concat(frames, ignore_index=True)
    return earlier.drop_duplicates(list(KEY), keep="last").reset_index(drop=True)


def check_records(records: pd.DataFrame) -> None:
    """Records need `source`, `id`, `url`, and none of the result columns yet."""
    missing = [c for c in (*KEY, "url") if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    clash = [c for c in RESULT_COLUMNS if c in records.columns]
    if clash:
        raise ValueError(f"records already have result column(s) {clash}")
