"""Arrays stored as folders of chunks that never change once written, read as one array.

A chunked array is a folder: ``part-<hash>.npy`` files (each a run of consecutive rows) and an
``index.json`` listing them in order with their row counts, the dtype and the shape. A chunk's
name is the hash of the keys of its rows (`chunk_name`, the memo's part names too): the same rows
under the same settings are the same file, so the memo's part and the pipeline output are one
file (hard-linked where the file system allows; DVC, under its default cache type, then makes
the output's file a copy of its own: docs/scale.md), and DVC, which caches a folder output file
by file, stores and pushes each chunk once, whatever later runs add.

Where chunks end (`boundaries`) depends on the rows' keys, not on their positions: a row ends a
chunk when its key's hash falls in one bucket of ``target`` (about one row in ``target``), at the
end of a group (a source), or when a chunk reaches four times ``target``. Adding photos (new ids
of a source, a new source) therefore adds chunks and rewrites at most the one that the new rows
join; removing a row rewrites the one chunk it was in; disabling a source drops its chunks from
the index. A from-scratch run and a run after an increment write the same folder.

Readers open the folder with `ChunkedArray`: ``len``, ``shape``, ``dtype``, ``ndim`` and
indexing (an int, a slice, an index array, with further axes after it) like a memory-mapped
.npy, each chunk mapped only when a row of it is read (at most `OPEN_CHUNKS` at once).

Why by hand: Zarr and Lance number their chunks and fragments by position, so inserting or
removing rows renames (rewrites) every later chunk, and a chunk cannot be the memo's file; an
Arrow or Parquet dataset would need the same content-named index on top and gives up
``np.load``'s memory map. The index here is a list of file names and lengths.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photoprep.core.errors import ACTIONABLE, StorageError, UserError
from photoprep.core.io import fsync_directory

INDEX = "index.json"
FORMAT = 1
# About this many bytes of rows in a chunk by default (``bucket.chunk_kb``): small enough that an
# increment rewrites little, large enough that a million 64x64 photos are about 6,000 files.
CHUNK_BYTES = 2 << 20
OPEN_CHUNKS = 256  # memory maps a reader keeps open (the kernel allows ~65,000 per process)


def chunk_name(keys: Sequence[str]) -> str:
    """The name of the chunk (and memo part) that holds ``keys``, in that order: a hash of them."""
    return "part-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def target_rows(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """The mean rows of a chunk of about `chunk_bytes` of rows of `row_bytes` each."""
    return max(1, chunk_bytes // max(1, row_bytes))


def boundaries(keys: Sequence[str], groups: Sequence[Any] | None, target: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of rows with these `keys` (hex digests), in order.

    A chunk ends after a row whose key's hash is 0 modulo `target`, at the last row of a group
    (consecutive equal `groups`), or at ``4 * target`` rows; so where a chunk ends depends on
    the rows near it, never on how many rows came before.
    """
    out: list[tuple[int, int]] = []
    start = 0
    cap = 4 * target
    n = len(keys)
    for i, key in enumerate(keys):
        last = i + 1 == n
        cut = last or (i + 1 - start) >= cap
        if not cut:
            cut = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % target == 0
        if not cut and groups is not None:
            cut = groups[i] != groups[i + 1]
        if cut:
            out.append((start, i + 1))
            start = i + 1
    return out


@dataclass(frozen=True)
class Chunk:
    """One chunk of a folder about to be written: its file name, its rows, and where its bytes
    come from (a file to link or copy, or a function that returns the array)."""

    name: str
    rows: int
    source: Path | Callable[[], np.ndarray]


def _place(chunk: Chunk, target: Path) -> None:
    if callable(chunk.source):
        array = chunk.source()
        with open(target, "wb") as handle:
            np.save(handle, array)
        return
    try:
        os.link(chunk.source, target)
    except OSError:  # another file system, or one without hard links: a copy, same bytes
        shutil.copyfile(chunk.source, target)


def _device(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev


def copy_bytes(source_dir: Path, folder: Path, total: int) -> int:
    """Bytes that writing `folder` from files in `source_dir` takes: none where they can be
    linked (one file system), `total` where they must be copied."""
    return 0 if _device(source_dir) == _device(folder) else total


def write_folder(
    folder: Path,
    chunks: Sequence[Chunk],
    dtype: Any,
    row_shape: tuple[int, ...],
    needed: int | None = None,
    origin: str | None = None,
) -> None:
    """Make `folder` the chunked array of `chunks`, in that order.

    A folder of the same dtype and row shape, whose new chunks are all files, is updated in
    place: a chunk whose file is there with the same bytes is not touched, new ones are placed,
    the index replaced, the others removed. So an increment writes only its own chunks, and DVC
    (the folder is a persisted output) hashes and caches only those. Otherwise the folder is
    built beside it under a temporary name and put in place when complete. A chunk that is a
    file is hard-linked (copied where linking fails), so it costs no disk. A write the user can
    fix (a full disk, a read-only folder) is a StorageError naming `folder` and the bytes `needed`.

    Whether a chunk's file holds its bytes: the same file; or, when the index's `origin` (the
    memo the chunks' files come from: `memo.Memo.origin`, its settings' and code's fingerprint)
    is this write's, a file of the same name and size, since a memo's part of that name has
    those bytes; else they are compared byte for byte (a name alone proves nothing: other
    settings give the same keys other pixels). DVC, under its default cache type, leaves a copy
    of each chunk, not the memo's link; with the origin a re-run reads none of them.
    """
    folder = Path(folder)
    total = sum(c.rows for c in chunks)
    index = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).str,
        "shape": [total, *row_shape],
        "chunks": [[c.name + ".npy", c.rows] for c in chunks],
    }
    if origin is not None:
        index["origin"] = origin
    present = _updatable(folder, index)
    if present is not None and all(isinstance(c.source, Path) for c in chunks):
        with _about(folder, needed):
            _update(folder, chunks, index, present)
        return
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with _about(folder, needed):
            tmp.mkdir(parents=True)
            for chunk in chunks:
                target = tmp / f"{chunk.name}.npy"
                if not target.exists():  # the same rows twice are one file
                    _place(chunk, target)
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
            old = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            elif folder.exists():
                folder.rename(old)
            tmp.rename(folder)
            fsync_directory(folder.parent)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _updatable(folder: Path, index: dict[str, Any]) -> dict[str, Any] | None:
    """The index of `folder` when it holds a chunked array of the same dtype and row shape."""
    try:
        old = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = ("format", "dtype")
    if (
        isinstance(old, dict)
        and all(old.get(k) == index[k] for k in same)
        and (list(old.get("shape", []))[1:] == index["shape"][1:])
    ):
        return old
    return None


def _same_bytes(a: Path, b: Path, named: bool) -> bool:
    """Whether two files hold the same bytes: one file twice, or (`named`: the index's origin is
    the source's) the same size, without reading them; else compared byte for byte."""
    if os.path.samefile(a, b):
        return True
    if named:
        return os.path.getsize(a) == os.path.getsize(b)
    return filecmp.cmp(a, b, shallow=False)


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    tmp_index = folder / f".{INDEX}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp_index.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_index, folder / INDEX)


def _update(folder: Path, chunks: Sequence[Chunk], index: dict[str, Any], old: dict[str, Any]) -> None:
    """`write_folder` in place: keep what stays, place what is new, then the index, then remove."""
    named = index.get("origin") is not None and old.get("origin") == index["origin"]
    if not named and old.get("origin") is not None:
        # Files of another origin are placed next: until the new index is in, no run may take a
        # file of the old origin's name for the old origin's bytes.
        _write_index(folder, {k: v for k, v in old.items() if k != "origin"})
    wanted = set()
    for chunk in chunks:
        target = folder / f"{chunk.name}.npy"
        wanted.add(target.name)
        assert isinstance(chunk.source, Path)
        if target.is_file() and not target.is_symlink() and _same_bytes(target, chunk.source, named):
            continue
        tmp = folder / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            _place(chunk, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    _write_index(folder, index)
    fsync_directory(folder)
    for path in folder.iterdir():
        if path.name != INDEX and path.name not in wanted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _about(folder: Path, needed: int | None) -> Iterator[None]:
    """An OS error the user can act on, on any file of the folder being built, is about `folder`."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, StorageError) or exc.errno not in ACTIONABLE:
            raise
        raise StorageError(exc.errno, folder, needed) from exc


class ChunkedArray:
    """The rows of a chunked-array folder, read like a memory-mapped ``.npy`` (read only)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(index["dtype"])
            self.shape: tuple[int, ...] = tuple(int(s) for s in index["shape"])
            self.names = [str(name) for name, _ in index["chunks"]]
            rows = np.array([int(r) for _, r in index["chunks"]], dtype=np.int64)
        except FileNotFoundError:
            raise UserError(f"{self.folder} is not an array folder (no {INDEX}): run `dvc repro`") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path} does not read ({exc}): run `dvc repro -f` of its stage") from None
        self.starts = np.concatenate([[0], np.cumsum(rows)])
        if self.starts[-1] != self.shape[0]:
            raise UserError(f"{path}: its chunks hold {self.starts[-1]} rows, its shape says {self.shape[0]}")
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def chunks(self) -> int:
        return len(self.names)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk `i`, memory-mapped."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path = self.folder / self.names[i]
        rows = int(self.starts[i + 1] - self.starts[i])
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} does not read ({exc}): run `dvc checkout` or `dvc repro`") from None
        if array.shape != (rows, *self.shape[1:]) or array.dtype != self.dtype:
            raise UserError(
                f"{path} holds {array.dtype} {array.shape}, {INDEX} says {self.dtype} "
                f"{(rows, *self.shape[1:])}: run `dvc checkout` or `dvc repro`"
            )
        self._open[i] = array
        if len(self._open) > OPEN_CHUNKS:
            self._open.popitem(last=False)
        return array

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, rows) of each chunk, in order."""
        for i in range(len(self.names)):
            yield int(self.starts[i]), int(self.starts[i + 1]), self.chunk(i)

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows at `rows` (ints), in that order, into `out` when given."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = self.shape[0]
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row {int(rows.max())} is outside {self.folder} ({n} rows)")
        rows = np.where(rows < 0, rows + n, rows)
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        for group in np.split(order, cuts) if len(order) else []:
            i = int(which[group[0]])
            out[group] = self.chunk(i)[rows[group] - self.starts[i]]
        return out

    def __getitem__(self, key: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, int | np.integer):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"row {int(key)} is outside {self.folder} ({self.shape[0]} rows)")
            i = int(np.searchsorted(self.starts, index, side="right") - 1)
            row = np.asarray(self.chunk(i)[index - self.starts[i]])
            return row[rest] if rest else row
        if isinstance(key, slice):
            rows = np.arange(self.shape[0])[key]
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
        out = self.take(rows)
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.take(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype)


def save(
    folder: str | Path, array: np.ndarray, keys: Sequence[str] | None = None, target: int | None = None
) -> None:
    """Write an in-memory `array` as the chunked array `folder`, cut by `keys` (one per row; by
    default the sha256 of each row's bytes) into chunks of about `target` rows (by default
    `CHUNK_BYTES`), each chunk named by the hash of its keys."""
    array = np.asarray(array)
    if keys is None:
        keys = [hashlib.sha256(np.ascontiguousarray(row).data).hexdigest() for row in array]
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    cuts = boundaries(keys, None, target or target_rows(row_bytes))
    chunks = [
        Chunk(chunk_name(keys[start:stop]), stop - start, rows_of(array, start, stop)) for start, stop in cuts
    ]
    write_folder(Path(folder), chunks, array.dtype, tuple(array.shape[1:]))


def rows_of(array: np.ndarray, start: int, stop: int) -> Callable[[], np.ndarray]:
    """A chunk's source that is the rows ``start:stop`` of `array` (an ndarray or a memory map),
    read only when the chunk is written."""
    return functools.partial(_read_rows, array, start, stop)


def _read_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.asarray(array[start:stop])
