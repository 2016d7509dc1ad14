"""The catalogue of a memo with arrays: every part's keys and file sizes in one Parquet table.

A memo with arrays (pixels, features) has a part per chunk of an output: some 255 parts at
40,000 photos, 6,000 at a million. Loading it part by part read every part's table (1.2 CPU s
under cProfile at 40,000 photos on this 2-core AMD, the largest share of a features re-run), a cost that
follows the collection, not the increment. With the catalogue a load reads one table, lists
the folder, and reads file by file only the parts the catalogue does not name (a run that died
before writing it, another process's parts).

A part is taken from the catalogue only when both its files are there with the sizes the
catalogue recorded when the part had been verified (parts are content-named and never
changed), and only when its name is the hash of the keys the catalogue gives it: a part
truncated or replaced since is read and verified as before. The catalogue is written with
Parquet page checksums and read verifying them; one that does not read is discarded with one
line, and the parts are read one by one. It is a shortcut, never the truth:
the folder's files are, so losing it, or a concurrent run replacing it, costs time only.

Why by hand: the memo's parts are its own format (`photoprep.images.memo`); this is a table of
them, written and read with Arrow.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from photoprep.core.chunked import chunk_name
from photoprep.core.io import write_with

CATALOG = "catalog.parquet"
_SCHEMA = pa.schema(
    [("part", pa.string()), ("key", pa.string()), ("table_bytes", pa.int64()), ("array_bytes", pa.int64())]
)


def file_sizes(directory: Path) -> dict[str, int]:
    """The size of every part file (``part-*``) in `directory`, by file name."""
    with os.scandir(directory) as entries:
        return {e.name: e.stat().st_size for e in entries if e.name.startswith("part-") and e.is_file()}


@dataclass
class Catalogued:
    """The parts a catalogue names whose files are as it recorded: their names in its order,
    each one's number of keys, and all their keys one part after another (bytes)."""

    names: list[str]
    counts: np.ndarray
    keys: np.ndarray
    dropped: int = 0  # parts it names whose files are gone or changed


def read(directory: Path, sizes: dict[str, int]) -> Catalogued:
    """The catalogue's parts whose two files have the sizes it recorded (`sizes`: `file_sizes`)."""
    empty = Catalogued([], np.zeros(0, np.int64), np.zeros(0, np.bytes_))
    path = directory / CATALOG
    if not path.exists():
        return empty
    try:
        table = pq.read_table(path, schema=_SCHEMA, page_checksum_verification=True)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        print(
            f"photoprep: memo catalogue {path} does not read ({type(exc).__name__}); discarded, "
            "the parts are read one by one",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(OSError):
            path.unlink()
        return empty
    parts = table.column("part").to_numpy(zero_copy_only=False)
    if not len(parts):
        return empty
    starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
    counts = np.diff(np.r_[starts, len(parts)])
    table_bytes = table.column("table_bytes").to_numpy()[starts]
    array_bytes = table.column("array_bytes").to_numpy()[starts]
    names = [str(name) for name in parts[starts]]
    good = np.array(
        [
            sizes.get(f"{name}.parquet") == int(t) and sizes.get(f"{name}.npy") == int(a)
            for name, t, a in zip(names, table_bytes, array_bytes, strict=True)
        ],
        dtype=bool,
    )
    keys = np.asarray(table.column("key").to_numpy(zero_copy_only=False), dtype=np.bytes_)
    pieces = np.split(keys, np.cumsum(counts)[:-1])
    # Each part's name must be the hash of its keys, as a part's own table must (memo.Memo).
    # (Only the parts whose files are as recorded are hashed: the others are read anyway.)
    good = np.array(
        [
            bool(ok) and chunk_name([k.decode() for k in piece]) == name
            for ok, name, piece in zip(good, names, pieces, strict=True)
        ],
        dtype=bool,
    )
    keys = keys[np.repeat(good, counts)]
    kept = [name for name, ok in zip(names, good, strict=True) if ok]
    return Catalogued(kept, counts[good], keys, dropped=int((~good).sum()))


def write(directory: Path, fresh: Mapping[str, Sequence[str]]) -> None:
    """Write the catalogue of the parts the present one names and the `fresh` ones (name: keys
    in row order), each with its files' present sizes, atomically; parts whose files are gone
    or changed are left out. A write the storage refuses is given up (the catalogue is a
    shortcut): the next load reads those parts one by one."""
    sizes = file_sizes(directory)
    old = read(directory, sizes)
    pieces = np.split(old.keys, np.cumsum(old.counts)[:-1]) if old.names else []
    segments = [(name, keys) for name, keys in zip(old.names, pieces, strict=True) if name not in fresh]
    segments += [
        (name, np.asarray([str(k).encode() for k in keys], dtype=np.bytes_)) for name, keys in fresh.items()
    ]
    names, counts, keys, table_bytes, array_bytes = [], [], [], [], []
    for name, part_keys in segments:
        t, a = sizes.get(f"{name}.parquet"), sizes.get(f"{name}.npy")
        if t is not None and a is not None and len(part_keys):
            names.append(name)
            counts.append(len(part_keys))
            keys.append(part_keys)
            table_bytes.append(t)
            array_bytes.append(a)
    n = np.asarray(counts, dtype=np.int64)
    table = pa.table(
        {
            "part": pa.array(np.repeat(np.asarray(names, dtype=object), n), pa.string()),
            "key": pa.array(np.concatenate(keys) if keys else np.zeros(0, np.bytes_), pa.binary()).cast(
                pa.string()
            ),
            "table_bytes": pa.array(np.repeat(np.asarray(table_bytes, np.int64), n)),
            "array_bytes": pa.array(np.repeat(np.asarray(array_bytes, np.int64), n)),
        },
        schema=_SCHEMA,
    )

    def save(tmp: Path) -> None:
        pq.write_table(table, tmp, write_page_checksum=True, use_dictionary=["part"])

    with contextlib.suppress(OSError):  # StorageError is an OSError
        write_with(directory / CATALOG, save, durable=True)
