"""Per-image records from the shard store, decoded once per parameter set (memoized)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep import parallel
from photoprep.images import containers, decode, memo
from photoprep.ingest import sniff
from photoprep.ingest.store import BlobReader
from photoprep.params import ComputeParams

PROBE_COLUMNS = ["decode_reason" if field == "reason" else field for field in decode.PROBE_FIELDS]

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


def _read(raw_dir: Path, locations: Sequence[BlobLocation]) -> list[bytes]:
    readers: dict[str, BlobReader] = {}
    try:
        out = []
        for source, shard, offset, size in locations:
            if source not in readers:
                readers[source] = BlobReader(raw_dir / source)
            out.append(readers[source].read(shard, offset, size))
        return out
    finally:
        for reader in readers.values():
            reader.close()


def _probe_batch(
    locations: Sequence[BlobLocation],
    raw_dir: Path,
    hash_name: str,
    hash_size: int,
    max_pixels: int,
    max_decode_mb: float | None,
    transforms: Sequence[str],
) -> list[dict]:
    blobs = _read(raw_dir, locations)
    return decode.probe_many(blobs, hash_name, hash_size, max_pixels, max_decode_mb, transforms)


def _pixels_batch(
    locations: Sequence[BlobLocation], raw_dir: Path, size: tuple[int, int], fit: str, max_pixels: int
) -> list[np.ndarray]:
    return [decode.resized_rgb(data, size, fit, max_pixels) for data in _read(raw_dir, locations)]


def _first_per_sha(table: pd.DataFrame, todo: list[str]) -> pd.DataFrame:
    """One row (a place to read the bytes from) for each sha256 still to decode."""
    firsts = table.drop_duplicates("sha256").set_index("sha256")
    return firsts.loc[todo].reset_index()


def probe_images(
    table: pd.DataFrame,
    raw_dir: Path,
    hash_name: str,
    hash_size: int,
    max_pixels: int,
    compute: ComputeParams,
    max_decode_mb: float | None = None,
    transforms: Sequence[str] = (),
) -> pd.DataFrame:
    """Format, size after orientation, mode, validity, perceptual hashes and the facts the
    keep rule reads (`decode.probe`) of each row's bytes.

    Rows need `source`, `shard`, `offset`, `size`, `sha256`. Each distinct sha256 is decoded at
    most once per (hash, hash_size, max_pixels, max_decode_mb, transforms, decoder code);
    later calls read the memo.
    """
    settings = {
        "hash": hash_name,
        "hash_size": hash_size,
        "max_pixels": max_pixels,
        "max_decode_mb": max_decode_mb,
        "transforms": list(transforms),
        "codecs": decode.codec_versions(),
    }
    # The sniff names the reason of payloads no opener identifies, so it is part of the value too.
    cache = memo.Memo("probe", memo.fingerprint(settings, decode, containers, sniff))
    todo = cache.missing(list(table["sha256"]))
    if todo:
        firsts = _first_per_sha(table, todo)
        results = parallel.map_batches(
            _probe_batch,
            _locations(firsts),
            compute,
            raw_dir,
            hash_name,
            hash_size,
            max_pixels,
            max_decode_mb,
            tuple(transforms),
            desc="decode+hash",
        )
        rows = pd.DataFrame(results).rename(columns={"reason": "decode_reason"})
        rows.insert(0, "sha256", firsts["sha256"].to_numpy())
        cache.put(rows[["sha256", *PROBE_COLUMNS]])
    memo.log_decodes("probe", decoded=len(todo), cached=table["sha256"].nunique() - len(todo))
    probed = cache.rows(list(table["sha256"]))
    return probed[PROBE_COLUMNS].set_index(table.index)


def resized_pixels(
    table: pd.DataFrame,
    raw_dir: Path,
    size: tuple[int, int],
    fit: str,
    max_pixels: int,
    compute: ComputeParams,
    namespace: str = "pixels",
) -> np.ndarray:
    """uint8 N x H x W x 3 pixels of each row, resized to `size` ([H, W]) by `fit`; memoized."""
    settings = {"size": list(size), "fit": fit, "max_pixels": max_pixels, "codecs": decode.codec_versions()}
    cache = memo.Memo(namespace, memo.fingerprint(settings, decode))
    todo = cache.missing(list(table["sha256"]))
    if todo:
        firsts = _first_per_sha(table, todo)
        arrays = parallel.map_batches(
            _pixels_batch,
            _locations(firsts),
            compute,
            raw_dir,
            tuple(size),
            fit,
            max_pixels,
            desc=f"resize {size[0]}x{size[1]}",
        )
        cache.put(firsts[["sha256"]], np.stack(arrays))
    memo.log_decodes(namespace, decoded=len(todo), cached=table["sha256"].nunique() - len(todo))
    if table.empty:
        return np.zeros((0, size[0], size[1], 3), np.uint8)
    return cache.arrays(list(table["sha256"]))


def thumbnails(
    groups: Sequence[pd.DataFrame],
    raw_dir: Path,
    size: tuple[int, int],
    max_pixels: int,
    compute: ComputeParams,
) -> np.ndarray:
    """Padded thumbnails of every row of ``groups``, in order (memoized apart from the pixels)."""
    if not groups:
        return np.zeros((0, size[0], size[1], 3), np.uint8)
    return resized_pixels(pd.concat(groups), raw_dir, size, "pad", max_pixels, compute, namespace="thumbs")
