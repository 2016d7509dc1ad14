"""Decode once: per-image results memoized by a key (sha256) under a fingerprint of params and code.

A memo lives in `<cache>/<namespace>/<fingerprint>/` as Parquet parts (plus `.npy` arrays
aligned with them). A stage puts one part per batch as the batch comes back from the workers,
so a run killed halfway (kill -9 included) keeps every batch that finished and a re-run
computes only what is missing. Parts are written atomically and durably (the array before its
table) and never changed.

Every part is verified before it is trusted: its table must read, its name must be the hash of
its keys, and its array (if it has one) must hold one row per key. A part that fails is
discarded with one line on stderr and its images are computed again. A memo with arrays keeps a
catalogue of its verified parts (`photoprep.images.catalog`): a part it names is trusted
without reading its table while both its files keep the sizes recorded then and its name is
the hash of the keys the catalogue gives it; any other part is verified as above. The cache is not a
pipeline output: deleting it costs time, never correctness, because the fingerprint names
everything the values depend on.

A part that cannot be written (a full disk, a read-only cache folder) stops the stage with one
line naming the memo's folder and `PHOTOPREP_CACHE` (`photoprep.core.errors`); the parts
written before stay, so the re-run decodes only what they do not hold. A part that cannot be
read for such a reason is not discarded: the disk is the problem, not the part.

Why one module
    The key index (`KeyIndex`: where each key's row lies, as sorted arrays) serves the memo
    alone and follows its rules (a part's number and positions, the first part wins); the
    memo's loading, reading and writing share the parts' names and verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

import photoprep
from photoprep.core import memory
from photoprep.core.chunked import chunk_name
from photoprep.core.errors import ACTIONABLE, StorageError, storage_path
from photoprep.core.io import atomic_path, write_table, write_with

# Where memos live is a path like any other (photoprep.core.layout); named here too for callers of the memo.
from photoprep.core.layout import CACHE_ENV as CACHE_ENV
from photoprep.core.layout import DEFAULT_CACHE as DEFAULT_CACHE
from photoprep.core.layout import cache_root as cache_root
from photoprep.images import catalog

KEY = "sha256"
# A row-only memo with more parts than this is merged into one part at the end of a run, so
# that loading it stays a few file reads (array memos are not merged: that would copy pixels).
COMPACT_PARTS = 64

# atomic_path's temporary names: ".<name>.<pid>-<random>.tmp".
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")


def fingerprint(settings: dict[str, Any], *modules: ModuleType) -> str:
    """A short hash of the settings and the source code of the modules that compute a value."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(photoprep.__version__.encode())
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


# A part is named by the hash of its keys, as a chunk of an output is: a chunk is a part.
part_name = chunk_name


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KeyIndex:
    """Where the row of each key lies: its part's number (`names`) and its position there.

    The keys are one sorted array of bytes (64 a sha256) beside one int64 each (part number and
    position), not a dict of Python strings and tuples (about 300 bytes a key); the keys of the
    latest parts wait in a small dict until they are an eighth of the array, then join it. A key
    that two parts hold keeps the first place it was given.

    Why not ``pd.Index(keys).get_indexer``, which gives the same positions: for an Arrow string
    index pandas builds a hash table of Python strings. At 144,564 sha256 keys (this 2-core AMD)
    that held 37 MB for the index plus 35 MB for its engine, against 15 MB here, and a lookup of a
    seventh of the keys took 77 ms against 17 ms. Arrow's ``index_in`` rebuilds its hash table on
    every call (81 ms).
    """

    MERGE = 4096  # keys that wait in the dict at least, before they join the array

    def __init__(self) -> None:
        self.names: list[str] = []
        self._numbers: dict[str, int] = {}
        self._keys = np.empty(0, dtype=np.bytes_)
        self._where = np.empty(0, dtype=np.int64)
        self._recent: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def __contains__(self, key: str) -> bool:
        return bool(self.where([key])[0] >= 0)

    def add(self, name: str, keys: Sequence[str]) -> None:
        """The keys of part `name`, in its row order."""
        number = self._numbers.setdefault(name, len(self.names))
        if number == len(self.names):
            self.names.append(name)
        held = self.where(keys) >= 0
        for position, key in enumerate(keys):
            if not held[position]:
                self._recent.setdefault(str(key), number << 32 | position)
        if len(self._recent) >= max(self.MERGE, len(self._keys) // 8):
            self._merge()

    def add_parts(self, names: Sequence[str], counts: np.ndarray, keys: np.ndarray) -> None:
        """Many parts at once into an empty index (a memo's catalogue): `keys` (bytes) are their
        keys one part after another, `counts` how many each part has."""
        assert not len(self), "add_parts fills an empty index"
        numbers = np.repeat(np.arange(len(names), dtype=np.int64), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        where = numbers << 32 | (np.arange(len(keys), dtype=np.int64) - starts)
        self.names = list(names)
        self._numbers = {name: number for number, name in enumerate(names)}
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        first = np.ones(len(ordered), dtype=bool)  # a key that two parts hold: the first part's place
        first[1:] = ordered[1:] != ordered[:-1]
        self._keys, self._where = ordered[first], where[order][first]

    def _merge(self) -> None:
        keys = np.concatenate([self._keys, _encoded(list(self._recent))])
        where = np.concatenate([self._where, np.fromiter(self._recent.values(), np.int64, len(self._recent))])
        order = np.argsort(keys, kind="stable")
        self._keys, self._where = keys[order], where[order]
        self._recent = {}

    def where(self, keys: Sequence[str]) -> np.ndarray:
        """int64 part number << 32 | position of each key, -1 where no part holds it."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(self._keys) and len(keys):
            encoded = _encoded(keys)
            at = np.minimum(np.searchsorted(self._keys, encoded), len(self._keys) - 1)
            found = self._keys[at] == encoded
            out[found] = self._where[at[found]]
        if self._recent:
            for slot in np.flatnonzero(out < 0).tolist():
                out[slot] = self._recent.get(str(keys[slot]), -1)
        return out

    def locate(self, keys: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(part name, slots in `keys`, positions in the part) of each part that holds some of
        `keys`, parts in the order of their first key; every key must be held (KeyError)."""
        where = self.where(keys)
        if (where < 0).any():
            raise KeyError(keys[int(np.flatnonzero(where < 0)[0])])
        numbers = where >> 32
        order = np.argsort(numbers, kind="stable")
        cuts = np.flatnonzero(np.diff(numbers[order])) + 1
        groups = sorted(np.split(order, cuts), key=lambda slots: int(slots[0]))
        for slots in groups:
            yield self.names[int(numbers[slots[0]])], slots, where[slots] & 0xFFFFFFFF


def _encoded(keys: Sequence[str]) -> np.ndarray:
    return np.array([str(key).encode() for key in keys], dtype=np.bytes_)


class DamagedPart(Exception):
    """A memo part that cannot be trusted (the message says why)."""


class Memo:
    """Rows (and optionally one array per row) keyed by sha256.

    ``arrays=True`` says every part must carry its array: a part whose array is missing or
    short is damaged. Whatever ``arrays`` says, an array that is there is verified.
    """

    def __init__(
        self, namespace: str, fingerprint: str, root: Path | None = None, arrays: bool = False
    ) -> None:
        self.directory = (root or cache_root()) / namespace / fingerprint
        self.with_arrays = arrays
        self.discarded = 0  # damaged parts set aside while loading
        self.parts_read = 0  # parts read file by file while loading (not taken from the catalogue)
        self._index = KeyIndex()
        # A part's rows; None: a part taken from the catalogue, read only if its rows are asked for.
        self._parts: dict[str, pd.DataFrame | None] = {}
        self._mapped: dict[str, np.ndarray] = {}
        self._fresh: dict[str, list[str]] = {}  # parts the catalogue does not name yet: their keys
        self._stale = False  # the catalogue names parts that are gone
        if self.directory.exists():
            self._remove_stale_temporaries()
            self._load()

    def _load(self) -> None:
        """The catalogue's parts (memos with arrays: `photoprep.images.catalog`), then every other
        part of the folder, verified."""
        sizes = catalog.file_sizes(self.directory)
        if self.with_arrays:
            known = catalog.read(self.directory, sizes)
            self._index.add_parts(known.names, known.counts, known.keys)
            self._parts = dict.fromkeys(known.names)
            self._stale = known.dropped > 0
        for name in sorted(f[: -len(".parquet")] for f in sizes if f.endswith(".parquet")):
            if name in self._parts:
                continue
            try:
                rows = self._verified(name)
            except DamagedPart as exc:
                self._discard(name, str(exc))
                continue
            self.parts_read += 1
            self._add_part(name, rows)

    # ------------------------------------------------------------------ loading

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of runs that died (their process is gone)."""
        for path in self.directory.iterdir():
            match = _TEMPORARY.match(path.name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _verified(self, name: str) -> pd.DataFrame:
        path = self.directory / f"{name}.parquet"
        try:
            rows = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            if isinstance(exc, OSError) and exc.errno in ACTIONABLE:
                # A failing disk or a folder this user may not read: the part may be sound.
                raise StorageError(exc.errno, path) from exc
            raise DamagedPart(f"its table does not read ({type(exc).__name__})") from None
        if KEY not in rows.columns:
            raise DamagedPart(f"its table has no {KEY} column")
        if part_name([str(k) for k in rows[KEY]]) != name:
            raise DamagedPart("its keys do not match its name")
        array_path = self.directory / f"{name}.npy"
        if array_path.exists():
            try:
                array = np.load(array_path, mmap_mode="r")
            except Exception as exc:
                raise DamagedPart(f"its array does not read ({type(exc).__name__})") from None
            if len(array) != len(rows):
                raise DamagedPart(f"its array has {len(array)} rows for {len(rows)} keys")
            self._mapped[name] = array
        elif self.with_arrays:
            raise DamagedPart("its array is missing")
        return rows

    def _discard(self, name: str, why: str) -> None:
        self.discarded += 1
        print(
            f"photoprep: memo part {self.directory / name} is damaged ({why}); discarded, "
            "its images are computed again",
            file=sys.stderr,
            flush=True,
        )
        for suffix in (".npy", ".parquet"):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{name}{suffix}").unlink()

    def _add_part(self, name: str, rows: pd.DataFrame | list[str]) -> None:
        """Part `name` is written: its rows, or only its keys when its rows are nothing but the keys
        (a chunk's part: its table is read again only if asked for, see `_rows_of`)."""
        if isinstance(rows, list):
            self._parts[name], keys = None, rows
        else:
            self._parts[name] = rows = rows.reset_index(drop=True)
            keys = rows[KEY].tolist()
        self._index.add(name, keys)
        if self.with_arrays:
            self._fresh[name] = keys

    def write_catalog(self) -> None:
        """Name every part of a memo with arrays in its catalogue, so that the next load reads
        one table, not a table per part (a no-op when the catalogue names them already)."""
        if self.with_arrays and (self._fresh or self._stale) and self.directory.exists():
            catalog.write(self.directory, self._fresh)
            self._fresh, self._stale = {}, False

    # ------------------------------------------------------------------ reading

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def origin(self) -> str:
        """The memo's namespace and fingerprint: a part's name under it says the part's bytes."""
        return f"{self.directory.parent.name}/{self.directory.name}"

    @property
    def parts(self) -> int:
        """How many parts the memo holds."""
        return len(self._parts)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The distinct keys not memoized yet, in first-seen order."""
        rows, _ = self.missing_rows(keys)
        return [keys[row] for row in rows.tolist()]

    def missing_rows(self, keys: Iterable[str]) -> tuple[np.ndarray, int]:
        """The position in `keys` of the first of each distinct key not memoized yet, in order,
        and how many distinct keys there are."""
        first: dict[str, int] = {}
        for position, key in enumerate(keys):
            first.setdefault(key, position)
        held = self._index.where(list(first))
        rows = np.fromiter(first.values(), np.int64, len(first))[held < 0]
        return rows, len(first)

    def rows(self, keys: Sequence[str]) -> pd.DataFrame:
        """Memoized rows for `keys`, in that order (every key must be present)."""
        if not len(keys):
            names = list(self._parts)
            return self._rows_of(names[0]).iloc[:0].copy() if names else pd.DataFrame({KEY: []})
        pieces, slots = [], []
        for name, at, positions in self._index.locate(keys):
            pieces.append(self._rows_of(name).iloc[positions])
            slots.append(at)
        # Row i of `found` holds keys[order[i]]: one more take puts them in the order of `keys`
        # (no index of Python ints, no sort of the whole frame).
        found = pieces[0] if len(pieces) == 1 else pd.concat(pieces, ignore_index=True)
        del pieces
        order = np.concatenate(slots)
        if bool((order == np.arange(len(order))).all()):
            return found.reset_index(drop=True)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return found.iloc[back].reset_index(drop=True)

    def _rows_of(self, name: str) -> pd.DataFrame:
        rows = self._parts[name]
        if rows is None:  # taken from the catalogue: read now
            rows = self._parts[name] = self._verified(name).reset_index(drop=True)
        return rows

    def _array(self, name: str) -> np.ndarray:
        if name not in self._mapped:
            self._mapped[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
        return self._mapped[name]

    def arrays(self, keys: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Memoized arrays for `keys`, stacked in that order (into `out` when given)."""
        if not len(keys):
            return out if out is not None else np.zeros((0,), np.uint8)
        for name, slots, positions in self._index.locate(keys):
            if out is None:  # the first key's part says the row shape and dtype
                first = self._array(name)
                out = np.empty((len(keys), *first.shape[1:]), dtype=first.dtype)
            out[slots] = self._array(name)[positions]
        assert out is not None
        return out

    # ------------------------------------------------------------------ writing

    def put(self, rows: pd.DataFrame, arrays: np.ndarray | None = None, *, held: bool = True) -> None:
        """Memoize rows (with a `sha256` column) and, if given, their arrays (first axis aligned).

        The part is durable when this returns: a kill after it keeps it. ``held=False`` keeps
        only its keys in memory; its rows are read again from its file when asked for.
        """
        if rows.empty:
            return
        name = part_name([str(k) for k in rows[KEY]])
        if arrays is not None and len(arrays) != len(rows):
            raise ValueError(f"{len(arrays)} arrays for {len(rows)} rows")
        with self._writing(name):
            if arrays is not None:
                npy = self.directory / f"{name}.npy"
                write_with(npy, lambda tmp: _save_npy(tmp, arrays), durable=True, needed=arrays.nbytes)
            write_table(rows, self.directory / f"{name}.parquet", durable=True)
        self._add_part(name, rows.reset_index(drop=True) if held else [str(k) for k in rows[KEY]])

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Write part `name`'s files in the block; a storage error removes its array (an array
        without its table would only take room) and says that the memo keeps its other parts."""
        try:
            with storage_path(self.directory):
                self.directory.mkdir(parents=True, exist_ok=True)
            yield
        except StorageError as exc:
            with contextlib.suppress(OSError):
                (self.directory / f"{name}.npy").unlink()
            kept = f"the memo keeps the {len(self._parts):,} parts it holds (not decoded again)"
            raise exc.keeping(kept, self.directory) from exc

    @contextlib.contextmanager
    def _streamed_part(self, keys: Sequence[str]) -> Iterator[Callable[[np.ndarray], None]]:
        """Yield ``add(rows)``, which appends the next rows of the part of exactly `keys` (every
        one computed, in order) to its array file; the part is put when the block ends.

        The rows go to the file as they come back, a batch at a time, so a chunk's arrays never
        sit in the heap together (a chunk's size is the data's, not a param: the largest grows
        with the collection). The file is the bytes `np.save` writes, written with plain writes
        (a full disk is an error on a write, not a fault in a mapped page).
        """
        name = part_name(keys)
        written = 0
        with self._writing(name):
            with atomic_path(self.directory / f"{name}.npy", durable=True) as tmp, open(tmp, "wb") as handle:

                def add(rows: np.ndarray) -> None:
                    nonlocal written
                    if not written:
                        shape = (len(keys), *rows.shape[1:])
                        header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False}
                        np.lib.format.write_array_header_1_0(handle, {**header, "shape": shape})
                    handle.write(np.ascontiguousarray(rows).data)
                    written += len(rows)

                yield add
                if written != len(keys):
                    raise ValueError(f"{written} arrays for {len(keys)} keys")
            write_table(pd.DataFrame({KEY: list(keys)}), self.directory / f"{name}.parquet", durable=True)
        self._add_part(name, list(keys))

    def fill(
        self,
        todo: Sequence[str],
        results: Iterable[tuple[Sequence[Any], Any]],
        part: Callable[[list[str], Any], tuple[pd.DataFrame, np.ndarray | None]],
    ) -> None:
        """Put one part per batch as ``(batch, result)`` pairs come back, in ``todo``'s order.

        A batch's keys are the next ``len(batch)`` keys of ``todo``; ``part(keys, result)`` turns
        them into the rows (with a ``sha256`` column) and the arrays (or None) to memoize.
        Each part's rows are on disk, not in the heap, until they are asked for: a pass over
        the whole collection holds a batch's rows, not every batch's.
        """
        done = 0
        for batch, result in results:
            keys = [str(k) for k in todo[done : done + len(batch)]]
            done += len(batch)
            self.put(*part(keys, result), held=False)
            memory.release()  # the batch is on disk: its copies need not stay in the heap
        self.write_catalog()

    # ------------------------------------------------------------------ chunks

    def holds_part(self, keys: Sequence[str]) -> bool:
        """Whether a part holds exactly `keys`, in that order (a chunk of an output)."""
        return part_name(keys) in self._parts

    def part_path(self, keys: Sequence[str]) -> Path:
        """The array file of the part that holds exactly `keys`."""
        return self.directory / f"{part_name(keys)}.npy"

    def put_chunk(self, keys: Sequence[str], fresh: Sequence[str], arrays: Any) -> None:
        """Memoize the part of exactly `keys`: the arrays of `fresh` keys are `arrays` (aligned
        with `fresh`), those of the others come from the memo's other parts."""
        computed = {key: position for position, key in enumerate(fresh)}
        new = np.asarray(arrays) if len(fresh) else None
        if new is not None and len(new) != len(fresh):
            raise ValueError(f"{len(new)} arrays for {len(fresh)} keys")
        old_slots = [slot for slot, key in enumerate(keys) if key not in computed]
        old = self.arrays([keys[slot] for slot in old_slots]) if old_slots else None
        like = new if new is not None else old
        assert like is not None
        out = np.empty((len(keys), *like.shape[1:]), dtype=like.dtype)
        if old is not None:
            out[old_slots] = old
        if new is not None:
            new_slots = [slot for slot, key in enumerate(keys) if key in computed]
            out[new_slots] = new[[computed[keys[slot]] for slot in new_slots]]
        self.put(pd.DataFrame({KEY: list(keys)}), out)

    def fill_chunks(
        self,
        chunks: Sequence[Sequence[str]],
        compute: Callable[[list[np.ndarray]], Iterable[tuple[Any, Any]]],
        batch: int = 256,
    ) -> int:
        """Make each chunk (the keys of consecutive output rows) a part of its own, in order;
        return how many keys were computed.

        Only the keys no part holds are computed, each once (for the first row that has it), in
        batches of at most `batch` taken in chunk order (a worker's memory is a batch's, whatever
        the chunk's size), each batch the int64 positions of its keys in the chunks laid end to
        end (the output's rows, when the chunks are its consecutive slices: no dict from key to
        row). ``compute(batches)`` yields one ``(batch, arrays)`` per batch, in order; each chunk
        is put as soon as its rows are back, so a killed run keeps every finished chunk.
        """
        starts = np.cumsum([0, *map(len, chunks)], dtype=np.int64)
        todo = [index for index, keys in enumerate(chunks) if not self.holds_part(keys)]
        # The positions of the chunks to fill, end to end; the first row of each key no part holds.
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in todo] or [np.empty(0, np.int64)])
        found, _ = self.missing_rows(itertools.chain.from_iterable(chunks[index] for index in todo))
        fresh = rows[found]
        del rows
        # The new rows of every chunk end to end, in batches: a few new photos over several
        # chunks are one batch (no worker started for them), a large chunk several.
        step = max(1, batch)
        pending = iter(compute([fresh[start : start + step] for start in range(0, len(fresh), step)]))
        carried: list[np.ndarray] = []  # rows computed past the chunk being filled (at most a batch)
        try:
            for index in todo:
                keys = chunks[index]
                low, high = np.searchsorted(fresh, starts[index : index + 2]).tolist()
                if high - low == len(keys):  # every row new, in order: to the part's file
                    with self._streamed_part(keys) as add:
                        self._take_rows(len(keys), pending, carried, add)
                else:  # some rows from other parts (a few, on a re-run): put_chunk mixes them
                    taken: list[np.ndarray] = []
                    self._take_rows(high - low, pending, carried, taken.append)
                    group = [keys[row] for row in (fresh[low:high] - starts[index]).tolist()]
                    self.put_chunk(keys, group, np.concatenate(taken) if taken else None)
                    del taken
                memory.release()
        finally:  # a failed put (a full disk) stops the workers now
            close = getattr(pending, "close", None)
            if close is not None:
                close()
        self.write_catalog()
        return len(fresh)

    @staticmethod
    def _take_rows(
        count: int, pending: Iterator[Any], carried: list[np.ndarray], take: Callable[[np.ndarray], None]
    ) -> None:
        """Pass the next `count` computed rows to `take`, batch by batch: first the rows `carried`
        over from the last chunk, then ``(batch, rows)`` from `pending`; leave the rest in `carried`."""
        while count:
            rows = carried.pop() if carried else np.asarray(next(pending)[1])
            take(rows[:count])
            if len(rows) > count:
                carried.append(rows[count:])
            count -= min(count, len(rows))

    def compact(self) -> None:
        """Merge the parts of a row-only memo into one (no-op for memos with arrays)."""
        if len(self._parts) <= 1 or self._mapped or self.with_arrays:
            return
        old = list(self._parts)
        merged = pd.concat([self._rows_of(n) for n in old], ignore_index=True).drop_duplicates(KEY)
        merged = merged.reset_index(drop=True)
        name = part_name([str(k) for k in merged[KEY]])
        write_table(merged, self.directory / f"{name}.parquet", durable=True)
        self._parts = {}
        self._index = KeyIndex()
        self._add_part(name, merged)
        for stale in old:
            if stale != name:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{stale}.parquet").unlink()


def write_step(batch_size: int, row_bytes: int, target_bytes: int = 32 << 20) -> int:
    """Rows per write of a streamed array: whole batches, about `target_bytes` at a time (each
    write is flushed, and a flush per small batch would spend more time in msync than in copying)."""
    batches = max(1, target_bytes // max(1, batch_size * row_bytes))
    return max(1, batch_size) * batches


def log_decodes(stage: str, decoded: int, cached: int) -> None:
    """Append how many images a stage decoded and how many came from the memo.

    The log sits beside the cache, outside every pipeline output, so that counting
    decodes never makes two runs' outputs differ.
    """
    path = cache_root() / "decodes.jsonl"
    with storage_path(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"stage": stage, "decoded": decoded, "cached": cached}) + "\n")
