"""The one way photoprep writes a file: to a unique temporary name beside it, then replace.

A reader (another stage, DVC, a person) sees the old file or the new one, never half of one,
and two processes writing the same path never share a temporary file. ``durable=True`` also
fsyncs the file and its folder before returning, for what must survive a power cut or kill -9
(shards, memo parts, status tables); outputs that a re-run rebuilds anyway skip it.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "atomic_path",
    "fsync_directory",
    "read_json",
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
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends cleanly it replaces ``path``.

    The temporary name is unique per call (process id and a random part), starts with a dot so
    globs over the folder skip it, and is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_with(path: str | Path, write: Callable[[Path], Any], *, durable: bool = False) -> None:
    """Atomically write ``path`` by calling ``write(tmp)`` on a temporary path."""
    with atomic_path(path, durable=durable) as tmp:
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


def write_table(table: pd.DataFrame, path: str | Path, *, durable: bool = False) -> None:
    """Write a Parquet (or CSV, by suffix) table atomically, without the pandas index."""
    if Path(path).suffix == ".csv":
        write_with(path, lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"), durable=durable)
    else:
        write_with(path, lambda tmp: table.to_parquet(tmp, index=False), durable=durable)


def write_array(array: np.ndarray, path: str | Path, *, durable: bool = False) -> None:
    """Save an array as .npy atomically (memory-mappable with ``np.load(mmap_mode='r')``)."""

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
        out[...] = array
        out.flush()
        del out

    write_with(path, write, durable=durable)
