"""Tables read and written a slice at a time: a stage's heap set by ``compute.memory_mb``, not by the
collection.

`slices` yields a Parquet file's rows as pandas frames of as many consecutive rows as fit the
budget, estimated from the file's own uncompressed bytes per row (times `COPIES`: the frame,
Arrow's batch and a transform's copies), and never more than `SLICE_BYTES` by that estimate: past a
few thousand rows a larger slice saves little CPU and adds heap that follows the table
(docs/scale.md, runs 35 to 40), so the budget lowers a slice, it does not raise it. `TableWriter`
writes frames as they come into row groups of `ROW_GROUP` rows under the schema of the first, to a
temporary name that replaces the file when closed, so the file's bytes depend on its rows only,
never on the budget (each row group is written from one array per column: the writer would cut
pages where slices met): a table of up to `ROW_GROUP` rows is the one row group that
`io.write_table` writes. `CsvWriter` does the same for a CSV report (the header once).

Neither side holds a row group in the heap: `slices` reads page by page (the pages and
dictionaries are at most `io.PAGE_BYTES`), and the rows waiting for their row group wait in a
scratch Arrow file beside the table, read back memory-mapped (`photoprep.core.spill`).

Why by hand: pyarrow reads (``ParquetFile.iter_batches``) and writes (``ParquetWriter``); this
module only ties the slice to a memory budget and fixes the row groups and the schema, which a
slice-by-slice writer must hold steady (a slice whose text column is all empty would otherwise
write it as another type).
"""

from __future__ import annotations

import abc
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from photoprep.core import io, spill
from photoprep.core.errors import storage_path

ROW_GROUP = io.ROW_GROUP
COPIES = 4
MIN_ROWS = 1024
# The most bytes of a slice (by the same estimate), whatever the budget: past a few thousand
# rows a larger slice saves little CPU and holds heap that follows the table. At 20,000 photos,
# validate's slices are then about 2,800 rows of the dedup table and split's 5,200 of the images
# table's six columns it reads (docs/scale.md, runs 35 to 40).
SLICE_BYTES = 2 << 20
MAX_ROWS = 1 << 18  # Parquet's sizes undercount a column of repeated values (kept as a dictionary)


def slice_rows(path: str | Path, memory_mb: int, columns: Sequence[str] | None = None) -> int:
    """How many rows of the Parquet file `path` a slice holds within `memory_mb`."""
    meta = pq.ParquetFile(path).metadata
    names = set(columns) if columns is not None else None
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if names is None or chunk.path_in_schema in names:
                total += chunk.total_uncompressed_size
    per_row = COPIES * max(1, total // max(1, meta.num_rows))
    return max(MIN_ROWS, min(MAX_ROWS, min(memory_mb << 20, SLICE_BYTES) // per_row))


def slices(path: str | Path, memory_mb: int, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
    """The rows of the Parquet file `path` (its `columns`, or all), in order, a slice at a time."""
    rows = slice_rows(path, memory_mb, columns)
    with storage_path(path):
        # Page by page: pyarrow's default (pre_buffer) reads each row group's columns whole first.
        handle = pq.ParquetFile(path, buffer_size=io.PAGE_BYTES, pre_buffer=False)
    try:
        cols = list(columns) if columns is not None else None
        empty = True
        # One thread: Arrow's decoding threads each keep their own malloc arena (20,200 rows of
        # the dedup table read with them kept 18 MB more after `memory.release`).
        for batch in handle.iter_batches(batch_size=rows, columns=cols, use_threads=False):
            empty = False
            frame = batch.to_pandas()
            del batch  # what the frame does not share goes now, not when the next slice comes
            yield frame
        if empty:  # no rows: one empty frame with the columns, as pd.read_parquet gives
            yield handle.schema_arrow.empty_table().select(cols or handle.schema_arrow.names).to_pandas()
    finally:
        handle.close()


def row_count(path: str | Path) -> int:
    """The rows of the Parquet file `path`, from its footer (no column is read)."""
    with storage_path(path):
        return pq.read_metadata(path).num_rows


def read_columns(path: str | Path, wanted: Sequence[str]) -> pd.DataFrame:
    """The columns of `wanted` that the Parquet file `path` has (the others are left out)."""
    with storage_path(path):
        present = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in wanted if c in present])


class TableWriter:
    """Frames appended as they come, written as one Parquet table at `path` when closed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.schema: pa.Schema | None = None
        self.writer: pq.ParquetWriter | None = None
        self.pending: spill.PendingRows | None = None

    def __enter__(self) -> TableWriter:
        return self

    def write(self, frame: pd.DataFrame) -> None:
        with storage_path(self.path, aliases=(str(self.tmp),)):
            if self.schema is None:
                self.schema = _steady_schema(frame)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.pending = spill.PendingRows(self.tmp, self.schema)
            assert self.pending is not None
            self.pending.add(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
            if self.pending.rows >= ROW_GROUP:
                self._flush(final=False)

    def _flush(self, final: bool) -> None:
        assert self.schema is not None and self.pending is not None
        if not self.pending.rows:
            return
        with storage_path(self.path, aliases=(str(self.tmp),)):
            # One array per column: the writer cuts pages where the slices met otherwise, and the
            # bytes would depend on the slices.
            table = self.pending.combined()
            cut = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, self.schema, **io.PARQUET_OPTIONS)
            self.writer.write_table(table.slice(0, cut), row_group_size=ROW_GROUP)
            self.pending.restart(table.slice(cut))

    def close(self) -> None:
        """Write what is left and put the file in place (an empty table if nothing came)."""
        if self.schema is None:
            raise ValueError(f"{self.path}: no frame was written, so the table has no columns")
        self._flush(final=True)
        with storage_path(self.path, aliases=(str(self.tmp),)):
            if self.writer is None:  # only empty frames: the file still has its columns
                self.writer = pq.ParquetWriter(self.tmp, self.schema, **io.PARQUET_OPTIONS)
                self.writer.write_table(self.schema.empty_table())
            self.writer.close()
            os.replace(self.tmp, self.path)
        self._discard()

    def _discard(self) -> None:
        if self.pending is not None:
            self.pending.remove()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
            return
        self._discard()
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _steady_schema(frame: pd.DataFrame) -> pa.Schema:
    """The Arrow schema of `frame` with text in place of the type of a column with no values."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    for i, field in enumerate(schema):
        if pa.types.is_null(field.type):
            schema = schema.set(i, field.with_type(pa.large_string()))
    return schema


class CsvWriter:
    """Frames appended to one CSV file (the header once), put in place at `path` when closed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.started = False

    def __enter__(self) -> CsvWriter:
        return self

    def write(self, frame: pd.DataFrame) -> None:
        with storage_path(self.path, aliases=(str(self.tmp),)):
            if not self.started:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(
                self.tmp,
                mode="a" if self.started else "w",
                header=not self.started,
                index=False,
                lineterminator="\n",
            )
        self.started = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and self.started:
            with storage_path(self.path, aliases=(str(self.tmp),)):
                os.replace(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)


class Rows(abc.ABC):
    """A table's rows, read some columns and a slice of rows at a time, wherever the table lives:
    in a frame (`InMemory`) or in a Parquet file (`InFile`, whose slices ``compute.memory_mb``
    sizes). A row is named by its position in the table, and every frame these give is indexed
    by it."""

    n: int
    columns: list[str]

    @abc.abstractmethod
    def pick(
        self, columns: Sequence[str], rows: np.ndarray, per_slice: int
    ) -> Iterator[tuple[int, pd.DataFrame]]:
        """(first place in `rows`, frame) of `per_slice` of `rows` at a time, in the order of
        `rows`; `columns` only."""

    def take(self, columns: Sequence[str], rows: np.ndarray) -> pd.DataFrame:
        """The `rows` (any order, repeats allowed) as one frame, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = [frame for _, frame in self.pick(columns, rows, max(1, len(rows)))]
        return parts[0] if parts else _frame_rows(self.empty(columns), columns, rows)

    @abc.abstractmethod
    def empty(self, columns: Sequence[str]) -> pd.DataFrame:
        """No row, with the `columns` and their types."""


class InMemory(Rows):
    """The rows of a frame, never copied whole: the columns asked for, a slice at a time."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.n = len(frame)
        self.columns = list(frame.columns)

    def pick(
        self, columns: Sequence[str], rows: np.ndarray, per_slice: int
    ) -> Iterator[tuple[int, pd.DataFrame]]:
        for start in range(0, len(rows), per_slice):
            yield start, _frame_rows(self.frame, columns, rows[start : start + per_slice])

    def empty(self, columns: Sequence[str]) -> pd.DataFrame:
        return self.frame[list(columns)].iloc[:0]


class InFile(Rows):
    """The rows of the Parquet file `path`, read in slices of as many rows as `memory_mb` holds
    (`slice_rows`): a pick asks for rows in ascending order, so that one pass reads them."""

    def __init__(self, path: str | Path, memory_mb: int) -> None:
        self.path = Path(path)
        self.memory_mb = memory_mb
        with storage_path(self.path):
            schema = pq.read_schema(self.path)
        self.columns = list(schema.names)
        self.n = row_count(self.path)

    def pick(
        self, columns: Sequence[str], rows: np.ndarray, per_slice: int
    ) -> Iterator[tuple[int, pd.DataFrame]]:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) < 2 or (rows[1:] >= rows[:-1]).all():
            yield from self._ascending(columns, rows, per_slice)
            return
        # Read in ascending order, then put in the order asked for.
        wanted, back = np.unique(rows, return_inverse=True)
        found = pd.concat([frame for _, frame in self._ascending(columns, wanted, len(wanted))])
        for start in range(0, len(rows), per_slice):
            yield start, found.iloc[back[start : start + per_slice]]

    def _ascending(
        self, columns: Sequence[str], rows: np.ndarray, per_slice: int
    ) -> Iterator[tuple[int, pd.DataFrame]]:
        if not len(rows):
            return
        done, first = 0, 0
        carry: pd.DataFrame | None = None  # fewer than per_slice rows, left from the slices before
        for frame in slices(self.path, self.memory_mb, columns):
            stop = first + len(frame)
            lo, hi = np.searchsorted(rows, [first, stop])
            wanted = rows[lo:hi]
            every = len(wanted) == len(frame) and (len(wanted) < 2 or bool((wanted[1:] > wanted[:-1]).all()))
            part = frame if every else frame.iloc[wanted - first]  # every row of the slice: no copy
            part.index = pd.Index(wanted, dtype=np.int64)
            del frame
            first, at = stop, 0
            if carry is not None:  # fill the slice begun before (only its rows are copied)
                at = min(len(part), per_slice - len(carry))
                carry = pd.concat([carry, part.iloc[:at]])
                if len(carry) < per_slice:
                    continue
                yield done, carry
                done, carry = done + len(carry), None
            while len(part) - at >= per_slice:
                yield done, part.iloc[at : at + per_slice]
                done, at = done + per_slice, at + per_slice
            carry = part.iloc[at:] if at < len(part) else None
            if first > rows[-1]:  # past the last row asked for
                break
        if carry is not None:
            yield done, carry
            done += len(carry)
        if done < len(rows):
            raise ValueError(f"{self.path}: asked for row {int(rows[done])} of {self.n}")

    def empty(self, columns: Sequence[str]) -> pd.DataFrame:
        with storage_path(self.path):
            return pq.read_schema(self.path).empty_table().select(list(columns)).to_pandas()


def rows_in_groups(
    path: str | Path, memory_mb: int, group: str, marked: str, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """The rows (their `columns`, or all) of the Parquet file `path` whose `group` holds a row
    whose text `marked` is not empty, in order; two passes of slices within `memory_mb` (the
    groups, then their rows), holding only those groups' numbers and rows in between."""
    records = InFile(path, memory_mb)
    every, per_slice = np.arange(records.n), slice_rows(path, memory_mb, [group, marked])
    found = [
        f[group].to_numpy()[(f[marked] != "").to_numpy()]
        for _, f in records.pick([group, marked], every, per_slice)
    ]
    wanted = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    rows = [
        start + np.flatnonzero(np.isin(f[group].to_numpy(), wanted))
        for start, f in records.pick([group], every, per_slice)
    ]
    at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return records.take(list(columns) if columns is not None else records.columns, at).reset_index(drop=True)


class KeyOrder:
    """Checks that the slices of the table at `path` come in (source, id) order, slice after
    slice: raises ValueError when they do not; `check` gives the first repeated key."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.last: tuple[str, str] | None = None

    def check(self, frame: pd.DataFrame) -> tuple[str, str, int] | None:
        """The first key of `frame` that repeats the one before it (source, id, times in the
        slice), or None."""
        if frame.empty:
            return None
        source = frame["source"].astype(str).to_numpy(dtype=object)
        ids = frame["id"].astype(str).to_numpy(dtype=object)
        if self.last is not None:
            source = np.concatenate([np.array([self.last[0]], dtype=object), source])
            ids = np.concatenate([np.array([self.last[1]], dtype=object), ids])
        same_source = source[:-1] == source[1:]
        if not ((source[:-1] < source[1:]) | (same_source & (ids[:-1] <= ids[1:]))).all():
            raise ValueError(f"{self.path}: the table is not sorted by source and id")
        self.last = (str(source[-1]), str(ids[-1]))
        repeats = np.flatnonzero(same_source & (ids[:-1] == ids[1:]))
        if not len(repeats):
            return None
        at = int(repeats[0])
        return str(source[at]), str(ids[at]), int(((source == source[at]) & (ids == ids[at])).sum())


def _frame_rows(frame: pd.DataFrame, columns: Sequence[str], rows: np.ndarray) -> pd.DataFrame:
    """`columns` of the rows at positions `rows` of `frame`, indexed by those positions."""
    out = pd.DataFrame({c: frame[c].iloc[rows].reset_index(drop=True) for c in columns})
    out.index = pd.Index(rows, dtype=np.int64)
    return out
