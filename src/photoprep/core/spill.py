"""Rows that wait for their Parquet row group on disk, not in the heap.

`photoprep.core.tables.TableWriter` writes a table's rows in row groups of a fixed size, each
column of a group from one array (so that the file's bytes depend on its rows only). The rows of
a group come in slices, and wait until the group is full. Here they wait in a scratch Arrow IPC
stream beside the table's temporary file, and are read back memory-mapped: their pages are the
page cache's, which the kernel may drop and write back, not the stage's anonymous memory.
`PendingRows.combined` makes each column one array through a second scratch file, one column at
a time, so the heap holds one column of a row group at most (writing 16,000 rows of ten 64-letter
texts 500 at a time: 27 MB of Arrow's buffers at the peak before, under 4 MB now).

Why by hand: Arrow's Parquet writer buffers a row group itself only in C++
(``NewBufferedRowGroup``), which pyarrow does not offer; pyarrow's ``write_table`` cuts a row
group from each call.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa


class PendingRows:
    """Rows added as they come, in a scratch Arrow stream beside `tmp` (``<tmp>.rows-<n>``), and
    given back memory-mapped with each column one array (`combined`)."""

    def __init__(self, tmp: Path, schema: pa.Schema) -> None:
        self.path = tmp.with_name(tmp.name + ".rows")
        self.schema = schema
        self.sink: pa.ipc.RecordBatchStreamWriter | None = None
        self.rows = 0
        self.generation = 0
        self.maps: list[pa.MemoryMappedFile] = []
        self.files: list[Path] = []  # the scratch files of this generation

    def add(self, table: pa.Table) -> None:
        if self.sink is None:
            self.files.append(self._rows_path())
            self.sink = pa.ipc.new_stream(self._rows_path(), self.schema)
        self.sink.write_table(table)
        self.rows += table.num_rows

    def _rows_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}-{self.generation}")

    def _read(self, path: Path) -> pa.Table:
        source = pa.memory_map(str(path))
        self.maps.append(source)
        return pa.ipc.open_stream(source).read_all()

    def combined(self) -> pa.Table:
        """The rows so far, memory-mapped, each column one array."""
        assert self.sink is not None
        self.sink.close()
        self.sink = None
        rows = self._read(self._rows_path())
        columns = []
        for i, column in enumerate(rows.columns):
            if column.num_chunks == 1:
                columns.append(column)
                continue
            one = pa.table([column.combine_chunks()], names=[rows.schema.names[i]])
            path = self.path.with_name(f"{self.path.name}-{self.generation}.col{i}")
            self.files.append(path)
            with pa.ipc.new_stream(path, one.schema) as out:
                out.write_table(one)
            del one
            columns.append(self._read(path).column(0))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def restart(self, rest: pa.Table) -> None:
        """Start again from `rest` (the rows after the ones written), dropping the files read."""
        old_maps, old_files = self.maps, self.files
        self.maps, self.files = [], []
        self.generation += 1
        self.rows = 0
        if rest.num_rows:
            self.add(rest)
        _drop(old_maps, old_files)

    def remove(self) -> None:
        """Remove the scratch files (after a fault too: the fault is the one to report)."""
        if self.sink is not None:
            with contextlib.suppress(OSError):
                self.sink.close()
            self.sink = None
        _drop(self.maps, self.files)
        self.maps, self.files = [], []


def _drop(maps: list[pa.MemoryMappedFile], files: list[Path]) -> None:
    """Unmap and remove scratch files (a buffer still using a map keeps it mapped until it goes)."""
    for source in maps:
        source.close()
    for path in files:
        path.unlink(missing_ok=True)
