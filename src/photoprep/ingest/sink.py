"""Where a download's results go: bodies to the store in target order, rows committed as they go.

`Sink.put(index, row, body)` takes the result of target `index` whatever order the responses
arrive in. Bodies are hashed (sha256, in the row) and handed to the shard writer in target
order (records sorted by source and id), so two runs that fetch the same bytes write the same
shards and the same table. Bodies that arrive ahead of a slow one wait in memory (up to
`memory_bytes`), then in a temporary file in the store folder, removed at `close`.

Resume at id granularity: every `commit_seconds` or `commit_every` stored bodies, the shard in
progress is fsynced and the ok rows stored so far (a prefix in target order) go into the
journal (`photoprep.ingest.journal`). Failed rows cost nothing to redo, so only stored bodies
count towards `commit_every`: a dead host's thousands of failures do not fsync the journal
thousands of times. After a failed write (a full disk) the sink stores nothing more; one last
commit (`salvage`, in the room the journal keeps for it) records what was stored whole, so a
full disk costs only the requests in flight.

A `Sink` is not thread-safe: a download calls it from one thread of its own (`SinkThread`), so that
hashing, shard writes and commits (fsyncs) stay off the event loop and a slow disk holds up no
request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from photoprep.core.params import DownloadParams
from photoprep.ingest.journal import Journal
from photoprep.ingest.rows import FetchRow, Results, journal_values
from photoprep.ingest.store import ShardWriter


class Targets:
    """(source, id, url) of each target, in target order, made when one is asked for, and the
    position of its record (its row in `Results`). The three columns stay as they came (Arrow
    arrays: the bytes of the texts and an offset each), where a tuple of three Python strings a
    target held about 300 bytes for the whole run."""

    def __init__(
        self, sources: Sequence[str], ids: Sequence[str], urls: Sequence[str], positions: np.ndarray
    ) -> None:
        self.columns = (sources, ids, urls)
        self.positions = positions

    @property
    def urls(self) -> Sequence[str]:
        return self.columns[2]

    def __len__(self) -> int:
        return len(self.urls)

    def between(self, start: int, stop: int) -> list[tuple[str, str, str]]:
        """Targets `start` to `stop` (a commit's), each column's slice turned into texts at once."""
        sources, ids, urls = (list(column[start:stop]) for column in self.columns)
        return list(zip(sources, ids, urls, strict=True))


class Sink:
    """Orders, spills and commits the results of one download's targets."""

    def __init__(
        self,
        writer: ShardWriter,
        journal: Journal,
        keys: Targets,
        p: DownloadParams,
        memory_bytes: int,
        results: Results,
    ):
        self.writer = writer
        self.journal = journal
        self.keys = keys  # (source, id, url) of each target, in target order
        self.results = results  # a row a record: target i's at keys.positions[i]
        self.every = p.commit_every
        self.seconds = p.commit_seconds
        self.memory_bytes = memory_bytes
        self.stored = 0  # targets [0, stored) have their bodies in the writer
        self.committed = 0  # targets [0, committed) are in the journal
        self.bodies = 0  # bodies stored since the last commit
        self.last = time.monotonic()
        # Bodies waiting for the ones before them: sha256 and body, or the offset in the spill file.
        self.waiting: dict[int, tuple[str, bytes | None, int, int] | None] = {}
        self.held = 0
        self.spill_fd = -1
        self.spill_path = ""
        self.spill_end = 0
        self.spilled = 0  # bodies waiting in the spill file
        self.failed = False  # a write failed (a full disk): nothing more is stored or committed

    def put(self, index: int, row: FetchRow, body: bytes | None) -> None:
        """The row of target `index` and its body (None when it failed): the body is stored once
        every target before it is, and the rows stored so far are committed when one is due.

        A write that fails raises; from then on `put` does nothing and nothing is committed but by
        `salvage`, which the caller may try once (then it cuts the store back to the last commit).
        """
        if self.failed:
            return
        try:
            self._put(index, row, body)
        except BaseException:
            self.failed = True
            raise

    def _put(self, index: int, row: FetchRow, body: bytes | None) -> None:
        self.results.record(self.keys.positions[index], row)
        self.bodies += body is not None
        if index == self.stored:
            if body is not None:
                self.writer.add(body, row.sha256)
            self.stored += 1
            if self.waiting:
                self._drain()
        elif body is None:
            self.waiting[index] = None
        elif self.held + len(body) <= self.memory_bytes:
            self.waiting[index] = (row.sha256, body, 0, len(body))
            self.held += len(body)
        else:
            self.waiting[index] = (row.sha256, None, self._spill(body), len(body))
            self.spilled += 1
        self.commit()

    def commit(self, force: bool = False) -> None:
        """Commit the rows of targets stored since the last commit, with the shard in progress,
        once `commit_every` bodies or `commit_seconds` have passed (or now, with `force`)."""
        upto = self.stored
        if upto <= self.committed or self.failed:
            return
        now = time.monotonic()
        if not force and self.bodies < self.every and now - self.last < self.seconds:
            return
        self._commit(upto, now)

    def salvage(self) -> None:
        """After a write failed for want of space: commit the rows of every body stored whole
        until then, in the room the journal kept for it. Best effort: when this fails too, or the
        writer could not undo the failed write, the last commit stands."""
        self.journal.release_reserve()
        if self.stored <= self.committed or self.writer.broken:
            return
        with contextlib.suppress(OSError):
            self._commit(self.stored, time.monotonic())

    def _commit(self, upto: int, now: float) -> None:
        state = self.writer.commit()
        # A failed row is fetched again anyway: only stored bodies need committing.
        positions = self.keys.positions[self.committed : upto]
        keys = self.keys.between(self.committed, upto)
        ok = np.flatnonzero(self.results.ok(positions))
        values = [journal_values(keys[i], self.results.row(positions[i])) for i in ok]
        self.journal.commit(values, state)
        self.committed = upto
        self.bodies = 0
        self.last = now

    def close(self) -> None:
        """Remove the spill file (the writer and the journal are the caller's)."""
        if self.spill_fd >= 0:
            os.close(self.spill_fd)
            os.unlink(self.spill_path)
            self.spill_fd = -1

    def _drain(self) -> None:
        while self.stored in self.waiting:
            item = self.waiting.pop(self.stored)
            if item is not None:
                sha256, body, offset, size = item
                if body is None:
                    body = _read_spill(self.spill_fd, offset, size)
                    self.spilled -= 1
                else:
                    self.held -= size
                self.writer.add(body, sha256)
            self.stored += 1  # once stored: `salvage` commits exactly the bodies the writer holds
        if self.spill_end and not self.spilled:
            os.ftruncate(self.spill_fd, 0)  # nothing waits in the file: reuse it from the start
            self.spill_end = 0

    def _spill(self, body: bytes) -> int:
        if self.spill_fd < 0:
            self.spill_fd, self.spill_path = tempfile.mkstemp(
                prefix=".tmp-", suffix=".spill", dir=self.writer.directory
            )
        offset = self.spill_end
        view = memoryview(body)
        while view:
            view = view[os.pwrite(self.spill_fd, view, offset + len(body) - len(view)) :]
        self.spill_end += len(body)
        return offset


class SinkThread:
    """A sink on a thread of its own: the rows built (bodies hashed and sniffed) and put there.

    One thread calls the sink, in the order results are handed over. The results handed over in
    one turn of the event loop go to the thread together, as one batch: the thread wakes once per
    turn instead of once per body (each wake took the interpreter's lock from the loop in the
    middle of its turn). `hand_over` returns at once; a worker waits for its previous hand-over
    before the next (`wait`), so at most one body per worker waits for the thread. A write that
    failed is raised by the next `check` or `wait` of every worker.

    Made inside the running event loop.
    """

    def __init__(self, sink: Sink):
        self.sink = sink
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="photoprep-sink")
        self.loop = asyncio.get_running_loop()
        self.error: BaseException | None = None
        self.batch: list[tuple[int, bytes | None, str, int, int]] = []
        self.batch_done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def hand_over(
        self, index: int, body: bytes | None, reason: str, http_status: int, attempts: int
    ) -> concurrent.futures.Future[None]:
        """Put target `index`'s result (its body, or None and the reason there is none) on the
        thread, with the others of this turn of the loop; done once they are all put."""
        if not self.batch:
            self.loop.call_soon(self._send)
        self.batch.append((index, body, reason, http_status, attempts))
        return self.batch_done

    def _send(self) -> None:
        if not self.batch:
            return  # sent already by `close`
        batch, done = self.batch, self.batch_done
        self.batch, self.batch_done = [], concurrent.futures.Future()
        self.thread.submit(self._put_all, batch, done)

    def _put_all(
        self, batch: list[tuple[int, bytes | None, str, int, int]], done: concurrent.futures.Future[None]
    ) -> None:
        try:
            for index, body, reason, http_status, attempts in batch:
                self._put(index, body, reason, http_status, attempts)
        except BaseException as exc:
            done.set_exception(exc)
            raise
        done.set_result(None)

    def _put(self, index: int, body: bytes | None, reason: str, http_status: int, attempts: int) -> None:
        if body is None:
            row = FetchRow.failed(reason, http_status, attempts)
        else:
            row = FetchRow.stored(body, http_status, attempts)
        try:
            self.sink.put(index, row, body)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def check(self) -> None:
        """Raise the write that failed, if one did: nothing fetched now could be stored."""
        if self.error is not None:
            raise self.error

    async def wait(self, handed: concurrent.futures.Future[None]) -> None:
        """Wait until `handed` is put (raising its failure); a cancelled wait leaves it queued."""
        if not handed.done():
            await asyncio.shield(asyncio.wrap_future(handed))
        handed.result()

    def close(self) -> None:
        """Put what was handed over, then end the thread: the sink is the caller's again."""
        self._send()
        self.thread.shutdown(wait=True)


def _read_spill(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"spill file: short read at {offset}")
    return data
