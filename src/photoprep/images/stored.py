"""Per-image work over stored bytes: each distinct sha256 read from its shard and decoded at most
once per settings (memoized, `photoprep.images.memo`), in batches on the compute backend.

The probe records of the dedup stage (`probe_images`), the bucket stage's resized pixels
(`write_pixels`), and the contact sheets' thumbnails (`thumbnails`). Workers are sent
locations (source, shard, offset, size), never bytes; they read the shards themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from photoprep import parallel
from photoprep.images import containers, decode, fingerprint, formats, memo, probe, resize
from photoprep.images.decode import DecodeLimits
from photoprep.images.probe import PROBE_FIELDS, ProbeSpec
from photoprep.images.resize import PixelSpec
from photoprep.ingest import sniff
from photoprep.ingest.blobs import BlobReader, RemoteBlobReader, open_reader
from photoprep.io import atomic_path
from photoprep.params import ComputeParams

PROBE_COLUMNS = ["decode_reason" if field == "reason" else field for field in PROBE_FIELDS]

# (source, shard, offset, size) locates a blob in data/raw/<source>/<shard>.
BlobLocation = tuple[str, str, int, int]


def _locations(table: pd.DataFrame) -> list[BlobLocation]:
    return list(
        zip(
            table["source"],
            table["shard"],
            table["offset"].astype(int),
            table["size"].astype(int),
            strict=True,
        )
    )


def blob_root(raw_dir: Path, compute: ComputeParams) -> str | Path:
    """Where the workers read shards: ``compute.storage`` (an fsspec URL or a path) or `raw_dir`.

    A Dask worker may run in another folder (or machine), so it gets `raw_dir` as an absolute path.
    """
    if compute.storage:
        return compute.storage
    return raw_dir.resolve() if compute.backend == "dask" else raw_dir


def _read(root: str | Path, locations: Sequence[BlobLocation]) -> list[bytes]:
    readers: dict[str, BlobReader | RemoteBlobReader] = {}
    try:
        out = []
        for source, shard, offset, size in locations:
            if source not in readers:
                readers[source] = open_reader(root, source)
            out.append(readers[source].read(shard, offset, size))
        return out
    finally:
        for reader in readers.values():
            reader.close()


def _probe_batch(locations: Sequence[BlobLocation], root: str | Path, spec: ProbeSpec) -> list[dict]:
    return probe.probe_many(_read(root, locations), spec)


def _pixels_batch(locations: Sequence[BlobLocation], root: str | Path, spec: PixelSpec) -> list[np.ndarray]:
    return [resize.resized_rgb(data, spec.size, spec.fit, spec.limits) for data in _read(root, locations)]


def _first_per_sha(table: pd.DataFrame, todo: list[str]) -> pd.DataFrame:
    """One row (a place to read the bytes from) for each sha256 still to decode."""
    firsts = table.drop_duplicates("sha256").set_index("sha256")
    return firsts.loc[todo].reset_index()


def _probe_part(keys: list[str], results: list[dict[str, Any]]) -> tuple[pd.DataFrame, None]:
    rows = pd.DataFrame(results).rename(columns={"reason": "decode_reason"})
    rows.insert(0, "sha256", keys)
    return rows[["sha256", *PROBE_COLUMNS]], None


def probe_images(table: pd.DataFrame, raw_dir: Path, spec: ProbeSpec, compute: ComputeParams) -> pd.DataFrame:
    """Format, size after orientation, mode, validity, perceptual hashes and the facts the
    keep rule reads (`probe.probe`) of each row's bytes.

    Rows need `source`, `shard`, `offset`, `size`, `sha256`. Each distinct sha256 is decoded at
    most once per spec and decoder code; later calls read the memo, which takes one part per
    batch as the batch comes back (a killed run keeps the finished batches).
    """
    # The sniff names the reason of payloads no opener identifies, so it is part of the value too.
    code = (probe, decode, fingerprint, formats, containers, sniff)
    cache = memo.Memo("probe", memo.fingerprint(spec.settings(), *code))
    keys = table["sha256"].tolist()
    todo = cache.missing(keys)
    if todo:
        firsts = _first_per_sha(table, todo)
        batches = parallel.imap_batches(
            _probe_batch, _locations(firsts), compute, blob_root(raw_dir, compute), spec, desc="decode+hash"
        )
        cache.fill(todo, batches, _probe_part)
        if cache.parts > memo.COMPACT_PARTS:
            cache.compact()
    memo.log_decodes("probe", decoded=len(todo), cached=len(set(keys)) - len(todo))
    probed = cache.rows(keys)
    return probed[PROBE_COLUMNS].set_index(table.index)


def memoize_pixels(
    table: pd.DataFrame, raw_dir: Path, spec: PixelSpec, compute: ComputeParams, namespace: str = "pixels"
) -> memo.Memo:
    """The pixel memo of `spec` and the decoder code, holding every row's sha256.

    Only the sha256s missing from it are decoded, one memo part per batch as the batches come
    back from the workers, so a killed run keeps every finished batch.
    """
    code = (resize, decode, formats, containers)
    cache = memo.Memo(namespace, memo.fingerprint(spec.settings(), *code), arrays=True)
    keys = table["sha256"].tolist()
    todo = cache.missing(keys)
    if todo:
        firsts = _first_per_sha(table, todo)
        height, width = spec.size
        batches = parallel.imap_batches(
            _pixels_batch,
            _locations(firsts),
            compute,
            blob_root(raw_dir, compute),
            spec,
            desc=f"resize {height}x{width}",
        )
        cache.fill(todo, batches, lambda keys, arrays: (pd.DataFrame({"sha256": keys}), np.stack(arrays)))
    memo.log_decodes(namespace, decoded=len(todo), cached=len(set(keys)) - len(todo))
    return cache


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
    table: pd.DataFrame, raw_dir: Path, spec: PixelSpec, compute: ComputeParams, path: Path
) -> None:
    """Write `resized_pixels` of `table` to the .npy file `path`, batch by batch, never all in memory.

    The file is filled through a memory map of its temporary name and replaces `path` when
    complete; its bytes equal ``io.write_array(resized_pixels(...), path)``.
    """
    cache = memoize_pixels(table, raw_dir, spec, compute)
    keys = table["sha256"].tolist()
    height, width = spec.size
    step = memo.write_step(compute.batch_size, height * width * 3)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keys), height, width, 3))
        for start in range(0, len(keys), step):
            cache.arrays(keys[start : start + step], out=out[start : start + step])
            out.flush()
        del out


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
