"""Blobs read back from the shard store by (shard, offset, size), as every table locates them.

`BlobReader` reads from a folder, `RemoteBlobReader` through fsspec from a URL prefix
(``compute.storage``, Dask workers elsewhere); both refuse a name that is not a shard's
(`check_shard_name`: a table is data, and a name in it must never become a path), and
`open_reader` a source name that is not plain.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from photoprep.core.errors import UserError, storage_path
from photoprep.ingest.store import SHARD_REF, pread_exact


class BlobReader:
    """Reads blobs back from the shards in `directory`; thread-safe, keeps shards open."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, shard: str, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset` of `shard` (a shard file name, never a path).

        A read the disk fails (EIO) is a StorageError naming the shard (`photoprep.core.errors`).
        """
        fd = self._fd(shard)
        with storage_path(self.directory / shard):
            return pread_exact(fd, offset, size)

    def close(self) -> None:
        """Close every open shard."""
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            return fd
        check_shard_name(shard)
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(self.directory / shard, os.O_RDONLY)
                self._fds[shard] = fd
        return fd


def check_shard_name(shard: str) -> None:
    """ValueError unless `shard` names a shard of ours: a file name, or ``part-NNNN/`` and a
    file name (never any other path)."""
    if not SHARD_REF.fullmatch(shard):
        # A table is data; a shard name that is not ours must not become a path.
        raise ValueError(f"not a shard name: {shard!r}")


class RemoteBlobReader:
    """Reads blobs through fsspec from ``<url>/<shard>`` (s3://, gs://, file://, memory://, ...).

    Each read is one byte-range request (``fs.cat_file(path, start, end)``); the shard name is
    checked as `BlobReader` checks it, so a table can never name another object.
    """

    def __init__(self, url: str):
        import fsspec  # only on this path: a local run never imports it

        self.url = url
        self._fs, root = fsspec.core.url_to_fs(url)
        self._root = root.rstrip("/")

    def __enter__(self) -> RemoteBlobReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, shard: str, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset` of `shard`, or ValueError when the object is shorter."""
        check_shard_name(shard)
        try:
            data = self._fs.cat_file(f"{self._root}/{shard}", start=offset, end=offset + size)
        except FileNotFoundError:
            raise UserError(
                f"compute.storage: {self.url.rstrip('/')}/{shard} does not exist: mirror data/raw there"
            ) from None
        if len(data) != size:
            raise ValueError(f"blob at offset {offset} (size {size}) runs past the end of {shard}")
        return bytes(data)

    def close(self) -> None:
        """Nothing to close: fsspec keeps its own connection pools."""


# A source name is a folder name under the store's root (photoprep.ingest.sources checks it too).
SOURCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def open_reader(root: str | Path, source: str) -> BlobReader | RemoteBlobReader:
    """A reader of `source`'s shards under `root`: a local folder (path) or an fsspec URL prefix."""
    if not SOURCE_NAME.fullmatch(source):
        raise ValueError(f"not a source name: {source!r}")
    if isinstance(root, str) and "://" in root:
        return RemoteBlobReader(f"{root.rstrip('/')}/{source}")
    return BlobReader(Path(root) / source)


def read_blobs(directory: Path, refs: Iterable[tuple[str, int, int]]) -> list[bytes]:
    """The bytes of each (shard, offset, size) in `refs`, in the order given."""
    refs = list(refs)
    # Reading in file order is kinder to disks; the answer keeps the caller's order.
    order = sorted(range(len(refs)), key=lambda i: (refs[i][0], refs[i][1]))
    out: list[bytes] = [b""] * len(refs)
    with BlobReader(directory) as reader:
        for i in order:
            shard, offset, size = refs[i]
            out[i] = reader.read(shard, int(offset), int(size))
    return out
