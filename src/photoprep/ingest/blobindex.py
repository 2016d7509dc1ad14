"""Where each blob of a store lies: sha256 -> (shard, offset, size), a few dozen bytes a blob.

The shard writer (`photoprep.ingest.store`) asks of every body it is handed whether the store
holds it already, and a download then places every row in its shard. A dict of sha256 texts to
one small object each held about 270 bytes a blob for the whole run (the key's text, the
object, its ints, the dict's slot): at a hundred million photos, tens of GB for a lookup table.

`BlobIndex` keeps the blobs in numpy arrays sorted by digest (32 bytes, a shard code, the
offset and size: 52 bytes a blob) and the latest few in a dict, merged into the arrays once
they are an eighth of them (`np.searchsorted` and `np.insert`: a linear merge, so the adds cost
O(n log n) in all). No well-kept library offers a growing set of byte keys without a Python
object per key: pandas and Arrow build their hash tables whole, once; hence these few lines.

Shards are named by a code (`shard_code`) given when the writer opens one and named for good
when it is closed (`name`), so a blob is indexed as it is written; a shard given up takes its
blobs with it (`forget`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

_MERGE_AT = 4096  # the dict of latest blobs is merged once it holds this many, or an eighth of the arrays


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a blob's bytes lie: shard file name, offset of the data in it, and size."""

    shard: str
    offset: int
    size: int


class BlobIndex(Mapping[str, BlobRef]):
    """sha256 (hex) -> BlobRef of the blobs a store holds; the first place added for a blob stays."""

    def __init__(self) -> None:
        self.names: list[str] = []  # shard name by code ('' while its shard is being written)
        self._digests = np.empty(0, "S32")  # sorted; compared as arrays, never as numpy scalars,
        self._codes = np.empty(0, np.int32)  # which drop trailing zero bytes
        self._offsets = np.empty(0, np.int64)
        self._sizes = np.empty(0, np.int64)
        self._latest: dict[bytes, tuple[int, int, int]] = {}

    def shard_code(self, name: str = "") -> int:
        """A new code for the shard `name` (or for one being written, named when it is closed)."""
        self.names.append(name)
        return len(self.names) - 1

    def name(self, code: int, name: str) -> None:
        self.names[code] = name

    def add(self, sha256: str, code: int, offset: int, size: int) -> None:
        """Index a blob of shard `code`, unless the index holds it already."""
        digest = bytes.fromhex(sha256)
        if self._find(digest) is None:
            self._latest[digest] = (code, offset, size)
            if len(self._latest) >= max(_MERGE_AT, len(self._digests) // 8):
                self._merge()

    def forget(self, code: int) -> None:
        """Drop every blob of shard `code` (a shard given up before it was finished)."""
        self._merge()
        keep = self._codes != code
        self._digests, self._codes = self._digests[keep], self._codes[keep]
        self._offsets, self._sizes = self._offsets[keep], self._sizes[keep]

    def locate(self, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard code and the offset of each blob of `sha256` (hex digests as numpy bytes),
        in one search of the arrays; KeyError for the first the index does not hold."""
        self._merge()
        digests = np.frombuffer(bytes.fromhex(sha256.astype("S64").tobytes().decode("ascii")), "S32")
        if not len(digests):
            return np.empty(0, np.int32), np.empty(0, np.int64)
        at = np.minimum(np.searchsorted(self._digests, digests), max(0, len(self._digests) - 1))
        found = self._digests[at] == digests if len(self._digests) else np.zeros(len(digests), bool)
        if not found.all():
            raise KeyError(sha256[~found][0].decode("ascii"))
        return self._codes[at], self._offsets[at]

    def __getitem__(self, sha256: str) -> BlobRef:
        found = self._find(bytes.fromhex(sha256)) if len(sha256) == 64 else None
        if found is None:
            raise KeyError(sha256)
        code, offset, size = found
        return BlobRef(self.names[code], offset, size)

    def __contains__(self, sha256: object) -> bool:
        if not isinstance(sha256, str) or len(sha256) != 64:
            return False
        return self._find(bytes.fromhex(sha256)) is not None

    def __len__(self) -> int:
        return len(self._digests) + len(self._latest)

    def __iter__(self) -> Iterator[str]:
        yield from (digest.hex() for digest in self._latest)
        rows = self._digests.view(np.uint8).reshape(-1, 32)
        yield from (row.tobytes().hex() for row in rows)

    def _find(self, digest: bytes) -> tuple[int, int, int] | None:
        found = self._latest.get(digest)
        if found is not None or not len(self._digests):
            return found
        key = np.array([digest], "S32")
        at = int(np.searchsorted(self._digests, key)[0])
        if at < len(self._digests) and self._digests[at : at + 1] == key:
            return int(self._codes[at]), int(self._offsets[at]), int(self._sizes[at])
        return None

    def _merge(self) -> None:
        if not self._latest:
            return
        digests = np.array(list(self._latest), "S32")
        values = np.array(list(self._latest.values()), np.int64).reshape(-1, 3)
        order = np.argsort(digests, kind="stable")
        digests, values = digests[order], values[order]
        at = np.searchsorted(self._digests, digests)
        self._digests = np.insert(self._digests, at, digests)
        self._codes = np.insert(self._codes, at, values[:, 0].astype(np.int32))
        self._offsets = np.insert(self._offsets, at, values[:, 1])
        self._sizes = np.insert(self._sizes, at, values[:, 2])
        self._latest = {}
