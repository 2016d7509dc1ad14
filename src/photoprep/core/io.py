"""The one way photoprep writes a file: to a unique temporary name beside it, then replace.

A reader (another stage, DVC, a person) sees the old file or the new one, never half of one,
and two processes writing the same path never share a temporary file. ``durable=True`` also
fsyncs the file and its folder before returning, for what must survive a power cut or kill -9
(shards, memo parts, status tables); outputs that a re-run rebuilds anyway skip it.

A write that fails for a reason the user can fix (a full disk, a read-only folder: see
`photoprep.core.errors`) raises a StorageError naming the file, not its temporary name, and
leaves no temporary file and no second traceback behind. An array of known size is checked
against the free space before a stage starts on it (`require_space`) and allocated in full
before it is filled through a memory map (`open_array`): a disk that fills meanwhile is an
OSError there, never a SIGBUS from a page the file system cannot back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from photoprep.core.errors import StorageError, storage_path

__all__ = [
    "atomic_path",
    "fsync_directory",
    "open_array",
    "read_json",
    "require_space",
    "write_array",
    "write_bytes",
    "write_json",
    "write_table",
    "write_text",
    "write_with",
]


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends cleanly it replaces ``path``.

    The temporary name is unique per call (process id and a random part), starts with a dot so
    globs over the folder skip it, and is removed if the block raises. An OS error the user can
    act on, in the block or in the replace, is a StorageError naming ``path`` (and the bytes
    `needed`, when the caller knows them).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with storage_path(path, needed, aliases=(str(tmp), str(path.parent))):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
            if durable:
                fsync_directory(path.parent)
    finally:
        # Not there (the block never made it), or a folder that refuses changes: the error that
        # brought us here is the one to report.
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_with(
    path: str | Path, write: Callable[[Path], Any], *, durable: bool = False, needed: int | None = None
) -> None:
    """Atomically write ``path`` by calling ``write(tmp)`` on a temporary path."""
    with atomic_path(path, durable=durable, needed=needed) as tmp:
        write(tmp)


def write_bytes(data: bytes, path: str | Path, *, durable: bool = False) -> None:
    """Write bytes atomically."""
    write_with(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def write_text(text: str, path: str | Path, *, durable: bool = False) -> None:
    """Write UTF-8 text atomically."""
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically, two-space indented, UTF-8 kept readable, newline at the end."""
    write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def read_json(path: str | Path) -> Any:
    """Read a UTF-8 JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# Rows of a Parquet row group: no table is one group of a million rows, and its footer (about
# 140 bytes a column a group) stays small at a hundred million rows.
ROW_GROUP = 16_384

# The most bytes of a Parquet data page and of a column's dictionary. A reader that streams a
# table page by page (photoprep.core.tables.slices) holds about one page and one dictionary of
# each column it reads: with pyarrow's defaults (1 MB each), reading the 20,200 rows of a dedup
# table in slices of 1,300 rows held up to 8.5 MB of Arrow's buffers at once, against 3.3 MB.
PAGE_BYTES = 64 << 10
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "data_page_size": PAGE_BYTES,
    "dictionary_pagesize_limit": PAGE_BYTES,
}


def write_table(table: pd.DataFrame, path: str | Path, *, durable: bool = False) -> None:
    """Write a Parquet (or CSV, by suffix) table atomically, without the pandas index, in row
    groups of `ROW_GROUP` rows (a table of fewer rows is the file ``to_parquet`` writes)."""
    if Path(path).suffix == ".csv":
        write_with(path, lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"), durable=durable)
    else:
        write_with(
            path,
            lambda tmp: table.to_parquet(tmp, index=False, row_group_size=ROW_GROUP, **PARQUET_OPTIONS),
            durable=durable,
        )


def write_array(array: np.ndarray, path: str | Path, *, durable: bool = False) -> None:
    """Save an array as .npy atomically (memory-mappable with ``np.load(mmap_mode='r')``)."""

    def write(tmp: Path) -> None:
        out = open_array(tmp, array.dtype, array.shape)
        out[...] = array
        out.flush()
        del out

    write_with(path, write, durable=durable, needed=array.nbytes)


def open_array(tmp: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file at `tmp`, memory-mapped for writing, every block of it allocated first.

    `np.lib.format.open_memmap` makes a sparse file: a page written through the map once the disk
    is full kills the process with SIGBUS. Allocating the file up front (`posix_fallocate`) turns
    a full disk into an OSError here, before any row is written. A file system that cannot
    allocate ahead (EOPNOTSUPP, EINVAL) is written as before.
    """
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            del out  # unmapped now: the caller removes the file and its blocks go back
            raise
    finally:
        os.close(fd)
    return out


def _existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (where its file system is known)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_space(needs: Sequence[tuple[Path, int]]) -> None:
    """Stop before starting when the files about to be written cannot fit.

    `needs` holds (path, bytes) of what a stage is about to write (a file, or the folder of a
    memo). Paths on one file system add up; a file system with fewer bytes free than its sum
    raises a StorageError naming the first of its paths, the bytes needed and the bytes free.
    """
    by_device: dict[int, tuple[Path, int, int]] = {}
    for path, size in needs:
        where = _existing(path)
        device = where.stat().st_dev
        first, total, free = by_device.get(device, (path, 0, shutil.disk_usage(where).free))
        by_device[device] = (first, total + size, free)
    for first, total, free in by_device.values():
        if total > free:
            raise StorageError(errno.ENOSPC, first, total, free=free, kept="nothing written", checked=True)
