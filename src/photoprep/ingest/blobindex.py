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

_ROW = np.dtype([("code", np.int32), ("offset", np.int64), ("size", np.int64)])  # packed: 20 bytes
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
        # Sorted; compared as arrays, never as numpy scalars, which drop trailing zero bytes.
        self._digests = np.empty(0, "S32")
        self._rows = np.empty(0, _ROW)  # where each of `_digests` lies
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
        keep = self._rows["code"] != code
        self._digests, self._rows = self._digests[keep], self._rows[keep]

    def locate(self, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard code and the offset of each blob of `sha256` (hex digests as numpy bytes),
        in one search of the arrays; KeyError for the first the index does not hold."""
        self._merge()
        digests = np.frombuffer(bytes.fromhex(sha256.astype("S64").tobytes().decode("ascii")), "S32")
        at, found = self._search(digests)
        if not found.all():
            raise KeyError(sha256[~found][0].decode("ascii"))
        rows = self._rows[at]
        return rows["code"], rows["offset"]

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
        latest = self._latest.get(digest)
        if latest is not None:
            return latest
        at, found = self._search(np.array([digest], "S32"))
        if not found[0]:
            return None
        code, offset, size = self._rows[at[0]].tolist()
        return code, offset, size

    def _search(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each of `digests` would lie in the sorted arrays (a valid row when there is one),
        and whether it is there."""
        if not len(self._digests):
            return np.zeros(len(digests), np.intp), np.zeros(len(digests), bool)
        at = np.minimum(np.searchsorted(self._digests, digests), len(self._digests) - 1)
        return at, self._digests[at] == digests

    def _merge(self) -> None:
        if not self._latest:
            return
        digests = np.array(list(self._latest), "S32")
        order = np.argsort(digests, kind="stable")
        digests, rows = digests[order], np.array(list(self._latest.values()), _ROW)[order]
        at = np.searchsorted(self._digests, digests)
        self._digests, self._rows = np.insert(self._digests, at, digests), np.insert(self._rows, at, rows)
        self._latest = {}
