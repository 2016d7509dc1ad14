"""The download as partition tasks: `download.partitions: P` splits a source's ids by a hash of
each id, and each partition is fetched by one task (joblib worker or Dask task, per
`compute.backend`), with `download.concurrency` and `download.per_host` divided among the P
tasks, so the hosts see the same caps in total.

Each partition is a download of its own, in its own folder ``<store>/part-<k>/``: its shards
(content-named, as always), its journal (a kill resumes each partition where it stopped) and
its status table ``rows.parquet``. Nothing is shared between partitions while they run, so no
shard depends on which task ran first or where. The stage then concatenates the partitions'
tables, names each row's shard ``part-<k>/shard-<hash>.tar`` (a relative name the blob readers
accept, never a path), and sorts by (source, id): the merged table is the same whatever order
the tasks ended in.

With ``partitions: 1`` (the default) the download is `fetch.download`, unchanged: shards at the
top of the store. A partition is fixed by the id alone (`partition_of`), so adding lines
re-fetches only the new and failed ids of each partition. Changing P moves every id to a new
folder: the next run fetches everything again there (the old shards are left where they are;
`dvc gc` or removing them by hand reclaims the space).

For workers on other machines the store must be a filesystem they share, mounted at the same
path; the shards stay content-named, so a task retried after a lost worker writes the same
bytes under the same names.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core import parallel
from photoprep.core.errors import Interrupted, StorageError
from photoprep.core.io import write_table
from photoprep.core.params import ComputeParams, DownloadParams
from photoprep.ingest import fetch
from photoprep.ingest.rows import KEY
from photoprep.ingest.store import PART_PREFIX

PART_TABLE = "rows.parquet"


def partition_of(records: pd.DataFrame, partitions: int) -> np.ndarray:
    """The partition (0..P-1) of each record: the first 8 bytes of sha256(source NUL id), mod P."""
    keys = zip(records["source"].astype(str), records["id"].astype(str), strict=True)
    values = [
        int.from_bytes(hashlib.sha256(f"{source}\0{id_}".encode()).digest()[:8], "big") % partitions
        for source, id_ in keys
    ]
    return np.asarray(values, dtype=np.int64)


def part_name(k: int) -> str:
    """The folder of partition `k` inside a source's store: ``part-0007``."""
    return f"{PART_PREFIX}{k:04d}"


def partition_params(p: DownloadParams) -> DownloadParams:
    """`p` for one of `p.partitions` tasks: requests in flight and per host divided, at least 1 each."""
    share = p.partitions
    return p.model_copy(
        update={
            "concurrency": max(1, math.ceil(p.concurrency / share)),
            "per_host": max(1, math.ceil(p.per_host / share)),
        }
    )


def fetch_partitions(
    batch: Sequence[tuple[int, pd.DataFrame]], place: fetch.Place, p: DownloadParams
) -> list[tuple[int, fetch.FetchResult | StorageError]]:
    """One task: fetch each (k, records) of `batch` into ``<store_dir>/part-<k>`` of `place`,
    resuming from its own table and journal there. Module level, so that joblib and Dask send it
    by name. A partition stopped by a full disk (or a read-only folder) is returned as its
    StorageError, not raised: the other tasks go on to their own end (each commits what it
    stored), instead of being stopped with whatever they had not committed yet."""
    out: list[tuple[int, fetch.FetchResult | StorageError]] = []
    for k, records in batch:
        folder = Path(place.store_dir) / part_name(k)
        table_path = folder / PART_TABLE
        previous = pd.read_parquet(table_path) if table_path.exists() else None
        part = fetch.Place(folder, place.base_dir, table_path)
        try:
            out.append((k, fetch.download(records, part, p, previous=previous, progress=False)))
        except StorageError as exc:
            out.append((k, exc))
    return out


def merge(results: Sequence[tuple[int, fetch.FetchResult]]) -> fetch.FetchResult:
    """One result of the partitions' results: tables concatenated with ``part-<k>/`` shard
    names, sorted by (source, id); counts summed; notes and hosts cut off, each partition's in turn."""
    tables, notes, hosts_down = [], [], []
    requested = reused = kept = 0
    interrupted = ""
    for k, result in sorted(results, key=lambda item: item[0]):
        table = result.table.copy()
        shard = table["shard"].astype(str)
        table["shard"] = np.where(shard != "", f"{part_name(k)}/" + shard, "")
        tables.append(table)
        notes += [f"{part_name(k)}: {note}" for note in result.notes]
        hosts_down += result.hosts_down
        requested += result.requested
        reused += result.reused
        kept += result.kept
        interrupted = interrupted or result.interrupted
    merged = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if len(merged):
        merged = merged.sort_values(list(KEY), kind="mergesort").reset_index(drop=True)
    return fetch.FetchResult(merged, requested, reused, hosts_down, notes, interrupted, kept)


def _kept(partitions: int, place: fetch.Place) -> str:
    return (
        f"each of the {partitions} partitions keeps the shards and status rows it had committed "
        f"(in {Path(place.store_dir).as_posix()}/part-NNNN/)"
    )


def download(
    records: pd.DataFrame,
    place: fetch.Place,
    p: DownloadParams,
    compute: ComputeParams,
    previous: pd.DataFrame | None = None,
) -> fetch.FetchResult:
    """The download of `records` into `place`: `fetch.download` itself with one partition; with
    more, one task per non-empty partition on `compute`'s backend, then `merge`. The merged table
    is written to `place.table_path` (durably) unless the run was interrupted."""
    if p.partitions == 1 or records.empty:
        return fetch.download(records, place, p, previous=previous)
    parts = partition_of(records, p.partitions)
    items = [
        (k, records[parts == k].reset_index(drop=True)) for k in range(p.partitions) if (parts == k).any()
    ]
    one_each = compute.model_copy(update={"batch_size": 1})
    # Workers may run in another folder: they get absolute paths.
    absolute = fetch.Place(Path(place.store_dir).resolve(), Path(place.base_dir).resolve())
    results: list[tuple[int, fetch.FetchResult]] = []
    faults: list[StorageError] = []
    try:
        for _, done in parallel.imap_batches(
            fetch_partitions,
            items,
            one_each,
            absolute,
            partition_params(p),
            desc=f"fetch {len(items)} partitions",
            unit="part",
        ):
            for k, outcome in done:
                if isinstance(outcome, StorageError):
                    faults.append(outcome)
                else:
                    results.append((k, outcome))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (errors.run_stage): the tasks are stopped with it
        raise Interrupted(f"interrupted: {_kept(len(items), place)}; run it again to resume") from None
    if faults:  # a full disk under some partitions: the others ended, each with its last commit
        raise faults[0].keeping(_kept(len(items), place))
    result = merge(results)
    if not result.interrupted and place.table_path is not None:
        write_table(result.table, place.table_path, durable=True)
    return result
