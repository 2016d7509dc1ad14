"""The download of one source: every record's url into its blob store, one status row each.

A record's `url` is an http(s) URL, a ``file://`` URL, or a path relative to the source folder
(`photoprep.ingest.targets`). Bytes go into the sharded store (`photoprep.ingest.store`), never
into files named after ids. Every record gets a row (`photoprep.ingest.rows`): ``status`` ok or
failed, with a ``reason`` such as ``http_404`` or ``timeout``; a failed fetch is data, not an
exception.

The jobs, one module each: the client (`photoprep.ingest.client`: requests, retries, per-host
pauses and cut-off), the targets (`photoprep.ingest.targets`: URL and path safety), the sink
(`photoprep.ingest.sink`: bodies to the store in record order, spilled while they wait, rows
committed to the journal as the run goes). This module resumes and runs the loop: `download`.
The event loop only answers sockets: hashing, shard writes and commits (fsyncs) run on one
thread of their own (`photoprep.ingest.sink.SinkThread`), so a slow disk holds up no request.

A run picks up the journal of an interrupted one and the table of a finished one: rows that are
ok, for the same url, whose blob the (verified) store holds are reused without a request,
keeping their columns; everything else is fetched again. Ctrl-C and SIGTERM stop the run after
a last commit (`FetchResult.interrupted`). A write that fails for a reason the user can fix (a
full disk, a read-only folder) stops every request, cuts the store back to the journal's last
commit and raises a StorageError saying what was kept. `FetchResult.hosts_down` says which hosts
the client cut off, and the error as the system gave it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from photoprep.core.console import Progress, count
from photoprep.core.errors import ACTIONABLE, StorageError, UserError
from photoprep.core.io import write_table
from photoprep.core.params import DownloadParams
from photoprep.ingest.client import Client, HostDown
from photoprep.ingest.journal import Journal, read_journal, remove_journal
from photoprep.ingest.rows import KEY, Results, check_records, earlier_frame, journal_values
from photoprep.ingest.sink import Sink, SinkThread, Targets
from photoprep.ingest.store import ShardWriter

_MIB = 2**20
_PROGRESS_EVERY = 64  # progress updates per this many images: one call per image costs more than it shows


def kept_phrase(kept: int, total: int) -> str:
    """What a stopped download keeps: 'kept 1,024 of 2,000 ids (shards and status rows committed)'."""
    return f"kept {count(kept)} of {count(total)} ids (shards and status rows committed)"


@dataclass
class FetchResult:
    """The table of a fetch and what happened on the way."""

    table: pd.DataFrame
    requested: int = 0  # records that needed a request (or a read) this run
    reused: int = 0  # records whose earlier ok row was kept without a request
    hosts_down: list[HostDown] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # damaged shards set aside, and the like
    interrupted: str = ""  # SIGINT | SIGTERM when the run was stopped; table is then the kept rows
    kept: int = 0  # rows committed (reused or finished) when interrupted

    def interrupted_line(self, stage: str) -> str:
        """What an interrupted run kept, as the one line a stage ends with."""
        kept = kept_phrase(self.kept, self.requested + self.reused)
        return f"{stage}: interrupted by {self.interrupted}: {kept}; run it again to resume"

    def problems(self, stage: str) -> list[str]:
        """One line per damaged shard set aside and per host cut off (unless `check_fetched` says it)."""
        lines = [f"{stage}: {note}" for note in self.notes]
        if self.interrupted or (self.table["status"] == "ok").any() or self.table.empty:
            lines += [down.line(stage) for down in self.hosts_down]
        return lines

    def check_fetched(self, stage: str, failed_csv: Path) -> None:
        """UserError (exit non-zero) when a source with ids fetched none: `dvc repro` stops there."""
        table = self.table
        if table.empty or (table["status"] == "ok").any():
            return
        if self.hosts_down:
            raise UserError(self.hosts_down[0].line(stage))
        reasons = table["reason"].value_counts()
        top = ", ".join(f"{reason} {count(int(n))}" for reason, n in reasons.head(3).items())
        raise UserError(f"{stage}: fetched 0 of {count(len(table))} ids ({top}); see {failed_csv.as_posix()}")

    def summary(self) -> str:
        """'2,000 ids: 1,990 ok (1,000 reused), 10 failed (http_404 10)'."""
        table = self.table
        ok = int((table["status"] == "ok").sum())
        failed = table.loc[table["status"] != "ok", "reason"].value_counts()
        top = ", ".join(f"{reason} {count(int(n))}" for reason, n in failed.head(3).items())
        line = f"{count(len(table))} ids: {count(ok)} ok ({count(self.reused)} reused, "
        line += f"{count(self.requested)} requested), {count(len(table) - ok)} failed"
        return line + (f" ({top})" if top else "")


@dataclass
class _Resume:
    """What a run starts from: the records sorted by key, a result row each (`Results`: those kept
    from earlier runs filled in, the others as they are fetched), the positions of the rows kept,
    the targets fetched, and the store's writer and journal opened for them."""

    records: pd.DataFrame
    results: Results
    reused: np.ndarray  # positions of the rows kept from earlier runs
    keys: Targets  # (source, id, url) and position of each record fetched, in order
    writer: ShardWriter
    journal: Journal

    def kept(self, committed: int) -> pd.DataFrame:
        """The table of the rows an interrupted run keeps: reused, and the first `committed`
        targets' ok rows."""
        fetched = self.keys.positions[:committed]
        order = np.sort(np.concatenate([self.reused, fetched[self.results.ok(fetched)]]))
        return self.results.take(order).table(self.records.iloc[order])

    def finished(self) -> pd.DataFrame:
        """The table of a finished run: every record's row, placed in the shards just flushed."""
        self.results.place(self.writer.flush())
        return self.results.table(self.records)


def _resume(
    records: pd.DataFrame, store_dir: Path, p: DownloadParams, previous: pd.DataFrame | None
) -> _Resume:
    """Open the store of `store_dir` for a run over `records`, keeping what earlier runs hold."""
    committed = read_journal(store_dir)
    writer = ShardWriter(store_dir, p.shard_mb * _MIB, resume=committed.open_shard)
    results = Results(len(records))
    matched = _reusable(records, earlier_frame(previous, committed.rows), writer)
    reused = matched["position"].to_numpy(dtype=np.int64)
    results.fill(reused, matched)
    # Rows an interrupted run committed and this run keeps open the new journal, so a kill now
    # loses none of them.
    carried = [
        journal_values((row.source, row.id, row.url), results.row(row.position))
        for row in matched[matched["journal"]].itertuples()
    ]
    journal = Journal(store_dir, carried, writer.commit())
    fetched = np.ones(len(records), dtype=bool)
    fetched[reused] = False
    positions = np.flatnonzero(fetched)
    # The records' columns at the positions fetched, kept as they are (Arrow), not as a tuple a
    # record; the records' own when every record is fetched.
    every = len(positions) == len(records)
    sources, ids, urls = (
        records[name].array if every else records[name].array.take(positions)
        for name in ("source", "id", "url")
    )
    return _Resume(records, results, reused, Targets(sources, ids, urls, positions), writer, journal)


def _sorted_by_key(records: pd.DataFrame) -> pd.DataFrame:
    """`records` sorted by (source, id), with positions for an index; not copied when they are
    in that order already (a manifest's records are, by id)."""
    keys = pa.table({name: pa.array(records[name]) for name in KEY})
    order = pc.sort_indices(keys, [(name, "ascending") for name in KEY]).to_numpy()
    if not np.array_equal(order, np.arange(len(records))):
        records = records.take(order)
    return records.reset_index(drop=True)


def _reusable(records: pd.DataFrame, earlier: pd.DataFrame, writer: ShardWriter) -> pd.DataFrame:
    """The earlier rows (`rows.earlier_frame`) that hold for `records`: the same key and url, and a
    blob the store holds; with the ``position`` of their record, in position order."""
    if earlier.empty:
        return earlier.assign(position=pd.Series([], dtype=np.int64))
    keys = records[[*KEY, "url"]].assign(position=np.arange(len(records)))
    matched = keys.merge(earlier.rename(columns={"url": "earlier_url"}), on=list(KEY), sort=False)
    matched = matched[matched["url"] == matched["earlier_url"]]
    held = np.fromiter((writer.holds(sha256) for sha256 in matched["sha256"]), bool, len(matched))
    return matched[held].sort_values("position", kind="mergesort").reset_index(drop=True)


async def _fetch_rows(
    client_of: Callable[[], Client], urls: Sequence[str], sink: Sink, bar: Progress
) -> tuple[list[HostDown], str]:
    """Fetch every target into the sink; the hosts cut off, and the signal that stopped the run
    ('' if none)."""
    if not len(urls):
        return [], ""
    storing = SinkThread(sink)
    try:
        async with client_of() as client:
            queue: Iterator[tuple[int, str]] = enumerate(urls)
            done = 0

            async def worker() -> None:
                nonlocal done
                handed: concurrent.futures.Future[None] | None = None
                for index, url in queue:  # one shared iterator: each target to one worker
                    storing.check()
                    outcome, attempts = await client.fetch_url(url)
                    if handed is not None:
                        await storing.wait(handed)
                    handed = storing.hand_over(
                        index, outcome.body, outcome.reason, outcome.http_status, attempts
                    )
                    done += 1
                    if done % _PROGRESS_EVERY == 0:
                        bar.update(_PROGRESS_EVERY)
                if handed is not None:
                    await storing.wait(handed)

            # Twice as many workers as request slots: a worker sleeping through a backoff holds
            # no slot, so the others keep the slots busy.
            tasks = [asyncio.ensure_future(worker()) for _ in range(min(len(urls), 2 * client.p.concurrency))]
            stopped = await _gather_until_signal(tasks)
            bar.update(done % _PROGRESS_EVERY)
    finally:
        storing.close()
    storing.check()
    return client.hosts_down(), stopped


async def _gather_until_signal(tasks: Sequence[asyncio.Future[Any]]) -> str:
    """Wait for `tasks`; SIGINT or SIGTERM cancels them all. The signal's name, or '' if none came."""
    loop = asyncio.get_running_loop()
    stopped = ""

    def stop(name: str) -> None:
        nonlocal stopped
        stopped = stopped or name
        for task in tasks:
            task.cancel()

    def fail_fast(task: asyncio.Future[Any]) -> None:
        # A worker that raised (a full disk under the sink) stops the others: nothing they fetch
        # now could be stored.
        if not task.cancelled() and task.exception() is not None:
            for other in tasks:
                other.cancel()

    for task in tasks:
        task.add_done_callback(fail_fast)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # RuntimeError also covers its subclass raised by loops without signal handlers (Windows).
    for sig in previous:
        with contextlib.suppress(ValueError, RuntimeError):
            loop.add_signal_handler(sig, stop, sig.name)
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    return stopped


@dataclass(frozen=True)
class Place:
    """Where a download goes: the store folder (shards and journal), the source folder local files
    are read from (and only from inside it), and where the finished table is written (None: not
    written, the caller keeps it)."""

    store_dir: Path
    base_dir: Path
    table_path: Path | None = None


def download(
    records: pd.DataFrame,
    place: Place,
    p: DownloadParams,
    *,
    previous: pd.DataFrame | None = None,
    progress: bool = True,
) -> FetchResult:
    """Fetch every record's `url` into the blob store of `place`; one result row per record.

    Columns: `source`, `id`, the other record columns unchanged, then `status` (ok | failed),
    `reason` ('' when ok), `http_status` (0 if none), `attempts` (requests made for the row,
    kept when the row is reused), `sha256`, `size`, `mime` (sniffed), `shard`, `offset`. Rows
    sorted by (source, id). Relative paths and file:// URLs are read from disk, from inside
    `place.base_dir`. `previous` is the table of the last finished run: its ok rows whose blob
    the store holds are kept without a request.

    Progress is committed to the store's journal as the run goes; with `place.table_path` the
    table is written there (durably) before the journal is removed, so no kill loses a committed
    row. Interrupted by SIGINT or SIGTERM, it returns at once with `interrupted` set, the table
    of the rows kept so far, and writes nothing more.
    """
    check_records(records)
    # Sorted first: rows come out by key, and bodies are stored in this order (deterministic shards).
    records = _sorted_by_key(records)
    store_dir = Path(place.store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    start = _resume(records, store_dir, p, previous)
    notes = list(start.writer.notes)
    sink = Sink(start.writer, start.journal, start.keys, p, p.shard_mb * _MIB, start.results)
    urls = start.keys.urls
    sources = records["source"].unique()
    desc = f"fetch {sources[0]}" if len(sources) == 1 else "fetch"
    cross_host = p.allow_cross_host_redirects
    try:
        with Progress(len(urls), desc, enabled=progress) as bar:
            client = functools.partial(Client, p, cross_host, Path(place.base_dir))  # made in the loop
            down, stopped = asyncio.run(_fetch_rows(client, urls, sink, bar))
        if stopped:
            sink.commit(force=True)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # the fault that brought us here is the one to report
            sink.close()
        fault = _storage_fault(exc, store_dir)
        if fault is not None:
            sink.salvage()  # what was stored whole until the fault, committed in the journal's reserve
        # The store as the journal's last commit left it: a full disk gets back the space past it.
        start.writer.cut_back(start.journal.last)
        start.journal.close()
        if fault is None:
            raise
        kept = len(start.kept(sink.committed))
        raise fault.keeping(kept_phrase(kept, len(records))) from exc
    sink.close()
    counts = (len(urls), len(start.reused))
    if stopped:
        start.writer.abandon()
        start.journal.close()
        partial = start.kept(sink.committed)
        return FetchResult(partial, *counts, down, notes, stopped, len(partial))
    table = start.finished()
    start.journal.close()
    del start, sink  # the rows' columns and the store's index, in the table now: not held while it is written
    if place.table_path is not None:
        write_table(table, place.table_path, durable=True)
    remove_journal(store_dir)
    return FetchResult(table, *counts, down, notes)


def _storage_fault(exc: BaseException, store_dir: Path) -> StorageError | None:
    """`exc` as a StorageError when a user can act on it (naming the store when it names no file)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in ACTIONABLE:
        return StorageError(exc.errno, exc.filename or store_dir)
    return None


def fetch_all(
    records: pd.DataFrame,
    place: Place,
    p: DownloadParams,
    *,
    previous: pd.DataFrame | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """`download`'s table: every record's row (see `download`)."""
    return download(records, place, p, previous=previous, progress=progress).table


def fetch_counts(table: pd.DataFrame) -> dict[str, Any]:
    """Funnel figures of a fetch table: fetched (ok rows), failed, failed_by_reason, bytes (of ok
    rows) and unique_sha256 (distinct payloads)."""
    ok = table["status"] == "ok"
    failed = table.loc[~ok, "reason"].value_counts()
    return {
        "fetched": int(ok.sum()),
        "failed": int((~ok).sum()),
        "failed_by_reason": {str(reason): int(n) for reason, n in sorted(failed.items())},
        "bytes": int(table.loc[ok, "size"].sum()),
        "unique_sha256": int(table.loc[ok, "sha256"].nunique()),
    }
