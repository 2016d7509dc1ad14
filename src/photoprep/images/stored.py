"""Per-image work over stored bytes: each distinct sha256 read from its shard and decoded at most
once per settings (memoized, `photoprep.images.memo`), in batches on the compute backend.

`decode_missing` runs one such pass (a `Pass`: the memo's namespace and key, the task a worker
runs on a batch of blobs, and how a batch's results become a memo part); the probe
(`photoprep.images.probe.probe_images`) and the keep rule's provenance
(`photoprep.images.provenance.provenance_reader`) are passes, and so are the pixels here: the
bucket stage's (`write_pixels`) and the contact sheets' thumbnails (`thumbnails`). Workers are
sent locations (source, shard, offset, size), never bytes; they read the shards themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from photoprep.core import chunked, parallel
from photoprep.core.io import require_space
from photoprep.core.params import ComputeParams
from photoprep.images import containers, decode, formats, memo, resize
from photoprep.images.decode import DecodeLimits
from photoprep.images.resize import PixelSpec
from photoprep.ingest.blobs import BlobReader, RemoteBlobReader, open_reader

# (source, shard, offset, size) locates a blob in data/raw/<source>/<shard>.
BlobLocation = tuple[str, str, int, int]
LOCATES = ["source", "sha256", "shard", "offset", "size"]  # the columns a pass reads of a table


@dataclass(frozen=True)
class Pass:
    """One memoized pass over stored images: where its results live (`namespace`, `key`: a
    fingerprint of the settings and code), the module-level `task(locations, root, *args)` a
    worker runs on a batch, and `part(keys, results)`, a batch's memo rows and arrays."""

    namespace: str
    key: str
    task: Callable[..., Any]
    args: tuple[Any, ...]
    part: Callable[[list[str], Any], tuple[pd.DataFrame, np.ndarray | None]]
    desc: str
    arrays: bool = False

    def memo(self) -> memo.Memo:
        """The memo this pass fills (what it already holds loaded and verified)."""
        return memo.Memo(self.namespace, self.key, arrays=self.arrays)


class Located:
    """Where the bytes of each row of `table` lie, as codes and numbers: about 32 bytes a row,
    where a `BlobLocation` a row is some 250 of Python's objects. `rows` locates rows by position,
    `of_rows` groups of them."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.source, sources = pd.factorize(table["source"].astype(str))
        self.shard, shards = pd.factorize(table["shard"].astype(str))
        self.sources, self.shards = np.asarray(sources, dtype=object), np.asarray(shards, dtype=object)
        self.offset = table["offset"].to_numpy(np.int64)
        self.size = table["size"].to_numpy(np.int64)

    def of_rows(self, groups: Sequence[np.ndarray]) -> Sequence[list[BlobLocation]]:
        """The locations of each group of row positions, made when the group is asked for."""
        return parallel.LazyGroups(self.rows, groups)

    def rows(self, positions: np.ndarray | Sequence[int]) -> list[BlobLocation]:
        at = np.asarray(positions, dtype=np.int64)
        sources = self.sources[self.source[at]].tolist()
        shards = self.shards[self.shard[at]].tolist()
        return list(zip(sources, shards, self.offset[at].tolist(), self.size[at].tolist(), strict=True))


def blob_root(raw_dir: Path, compute: ComputeParams) -> str | Path:
    """Where the workers read shards: ``compute.storage`` (an fsspec URL or a path) or `raw_dir`.

    A Dask worker may run in another folder (or machine), so it gets `raw_dir` as an absolute path.
    """
    if compute.storage:
        return compute.storage
    return raw_dir.resolve() if compute.backend == "dask" else raw_dir


def read_blobs(root: str | Path, located: Sequence[BlobLocation]) -> Iterator[bytes]:
    """The bytes at each location, read in a worker one at a time, as the caller asks for them:
    a batch's blobs (6 MB for 256 photos of 23 KB) are never all held at once."""
    readers: dict[str, BlobReader | RemoteBlobReader] = {}
    try:
        for source, shard, offset, size in located:
            if source not in readers:
                readers[source] = open_reader(root, source)
            yield readers[source].read(shard, offset, size)
    finally:
        for reader in readers.values():
            reader.close()


def decode_missing(
    table: pd.DataFrame, raw_dir: Path, compute: ComputeParams, job: Pass, cache: memo.Memo | None = None
) -> memo.Memo:
    """The memo of `job` (`cache`, when the caller opened it already), holding every row's sha256:
    only the sha256s missing from it are decoded, one memo part per batch as the batches come back
    from the workers, so a killed run keeps every finished batch."""
    cache = job.memo() if cache is None else cache
    sha256 = table["sha256"]
    rows, distinct = cache.missing_rows(sha256)
    if len(rows):
        # While the workers decode, this process holds per photo a row number, the missing
        # sha256s as one Arrow column and where the bytes lie as numbers (`Located`), not a Python
        # string a photo; each batch's locations are made when the batch is sent.
        todo = sha256.array.take(rows)
        root = blob_root(raw_dir, compute)
        groups = Located(table).of_rows(parallel.batches(rows, compute.batch_size))
        batches = parallel.imap_groups(
            job.task, groups, compute, root, *job.args, desc=job.desc, total=len(rows), local_first=True
        )
        with contextlib.closing(batches):  # a failed put (a full disk) stops the workers now
            cache.fill(todo, batches, job.part)
    memo.log_decodes(job.namespace, decoded=len(rows), cached=distinct - len(rows))
    return cache


@parallel.in_threads
def _pixels_batch(located: Sequence[BlobLocation], root: str | Path, spec: PixelSpec) -> np.ndarray:
    """The batch's pixels as one array, made in a thread of the stage's process under joblib
    (Pillow decodes and resizes with the GIL released: photoprep.core.parallel's notes)."""
    out = np.empty((len(located), *spec.size, 3), dtype=np.uint8)
    for row, data in enumerate(read_blobs(root, located)):
        out[row] = resize.resized_rgb(data, spec.size, spec.fit, spec.limits)
    return out


def _pixels_part(keys: list[str], pixels: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    return pd.DataFrame({"sha256": keys}), pixels


def pixels_pass(spec: PixelSpec, namespace: str = "pixels") -> Pass:
    """The pass that resizes images to `spec`, memoized under `spec` and the decoder code."""
    key = memo.fingerprint(spec.settings(), resize, decode, formats, containers)
    height, width = spec.size
    return Pass(namespace, key, _pixels_batch, (spec,), _pixels_part, f"resize {height}x{width}", arrays=True)


def memoize_pixels(
    table: pd.DataFrame, raw_dir: Path, spec: PixelSpec, compute: ComputeParams, namespace: str = "pixels"
) -> memo.Memo:
    """The pixel memo of `spec` and the decoder code, holding every row's sha256."""
    return decode_missing(table, raw_dir, compute, pixels_pass(spec, namespace))


def resized_pixels(
    table: pd.DataFrame, raw_dir: Path, spec: PixelSpec, compute: ComputeParams, namespace: str = "pixels"
) -> np.ndarray:
    """uint8 N x H x W x 3 pixels of each row, resized to `spec`'s size by its fit; memoized.

    The whole array is in memory: for a pipeline output use `write_pixels`, which streams.
    """
    cache = memoize_pixels(table, raw_dir, spec, compute, namespace)
    out = np.zeros((len(table), *spec.size, 3), np.uint8)
    return cache.arrays(table["sha256"].tolist(), out=out)


def write_pixels(
    table: pd.DataFrame,
    raw_dir: Path,
    spec: PixelSpec,
    compute: ComputeParams,
    path: Path,
    chunk_bytes: int = chunked.CHUNK_BYTES,
) -> None:
    """Write `resized_pixels` of `table` as the chunked array folder `path` (`photoprep.core.chunked`).

    Each chunk of rows (about `chunk_bytes`, cut where the rows' sha256 say, per source) is a part
    of the pixel memo, decoded only for the sha256s that no part holds, and hard-linked into `path`:
    the memo and the output are one file, and a chunk that an earlier run wrote is neither decoded
    nor written again. Before any image is decoded, the free space is checked for the new chunks
    (and for the whole array when the memo is on another file system, where links become copies).
    """
    job = pixels_pass(spec)
    cache = job.memo()
    keys = table["sha256"].tolist()
    height, width = spec.size
    row_bytes = height * width * 3
    cuts = chunked.boundaries(keys, table["source"].tolist(), chunked.target_rows(row_bytes, chunk_bytes))
    chunks = [keys[start:stop] for start, stop in cuts]
    new_rows = sum(len(c) for c in chunks if not cache.holds_part(c))
    out_bytes = chunked.copy_bytes(cache.directory, path, len(keys) * row_bytes)
    require_space([(cache.directory, new_rows * row_bytes), (path, out_bytes)])
    where = Located(table)
    root = blob_root(raw_dir, compute)

    def decode(groups: list[np.ndarray]) -> Any:  # groups of rows: the chunks are slices of `keys`
        total = sum(len(group) for group in groups)
        return parallel.imap_groups(
            job.task,
            where.of_rows(groups),
            compute,
            root,
            *job.args,
            desc=job.desc,
            total=total,
            local_first=True,
        )

    decoded = cache.fill_chunks(chunks, decode, compute.batch_size)
    memo.log_decodes(job.namespace, decoded=decoded, cached=len(set(keys)) - decoded)
    parts = [chunked.Chunk(memo.part_name(c), len(c), cache.part_path(c)) for c in chunks]
    needed = out_bytes or None
    chunked.write_folder(path, parts, np.uint8, (height, width, 3), needed=needed, origin=cache.origin)


def thumbnails(
    groups: Sequence[pd.DataFrame],
    raw_dir: Path,
    size: tuple[int, int],
    limits: DecodeLimits,
    compute: ComputeParams,
) -> np.ndarray:
    """Padded thumbnails of `size` of every row of ``groups``, in order (memoized apart from the pixels)."""
    if not groups:
        return np.zeros((0, *size, 3), np.uint8)
    spec = PixelSpec(size, "pad", limits)
    return resized_pixels(pd.concat(groups), raw_dir, spec, compute, namespace="thumbs")
