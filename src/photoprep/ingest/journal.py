"""The download's commit log: status rows and the shard in progress, made durable as a run goes.

A download appends to ``<store>/.journal.jsonl`` every few seconds or few dozen images (the
params ``download.commit_seconds`` and ``download.commit_every``): first the shard in
progress is fsynced (`ShardWriter.commit`), then the ok rows finished since the last commit
go in as one JSON line each (a failed row is fetched again anyway), then a commit line
naming the shard in progress and its committed length, then fsync. Rows are committed in
record order, a prefix at a time, so after a kill the next run holds a prefix of the work and
appends the rest to the same shard: its shards and table are those of a run that was never
interrupted.

`read_journal` trusts only what a commit line closes: a torn last line (kill -9 in the middle
of a write, or a disk that filled during it) and rows after the last commit line are dropped.
The journal is removed once the run's table is written; a hidden name keeps it out of every
glob of shards.

A full disk costs no committed row, and little more: the journal keeps a small reserve of space
(``.journal.jsonl.reserve``, allocated when it starts), and a download whose write fails for want
of space gives it back and commits what it had stored whole until then (`Journal.release_reserve`,
`photoprep.ingest.sink.Sink.salvage`). A commit that fails is cut off the file, never left torn
under the next one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from photoprep.core.errors import storage_path
from photoprep.core.io import fsync_directory
from photoprep.ingest.rows import JOURNAL_FIELDS
from photoprep.ingest.store import OpenState

JOURNAL_NAME = ".journal.jsonl"
# Room kept beside the journal, given back when the disk fills, so that the rows stored until then
# can still be committed (about a thousand rows; a download commits every `commit_every`).
RESERVE_NAME = ".journal.jsonl.reserve"
RESERVE_BYTES = 256 << 10


@dataclass
class Committed:
    """What a journal holds: rows by (source, id), and the shard in progress at the last commit."""

    rows: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    open_shard: OpenState | None = None
    commits: int = 0


def journal_path(store_dir: Path) -> Path:
    return Path(store_dir) / JOURNAL_NAME


def read_journal(store_dir: Path) -> Committed:
    """The committed rows and shard state of an interrupted run (empty when there is none)."""
    path = journal_path(store_dir)
    found = Committed()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return found
    pending: list[dict[str, Any]] = []
    for line in data.split(b"\n"):
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            break  # a torn write: nothing after it was committed
        if isinstance(item, list) and len(item) == len(JOURNAL_FIELDS):
            pending.append(dict(zip(JOURNAL_FIELDS, item, strict=True)))
        elif isinstance(item, dict) and "commit" in item:
            for row in pending:
                found.rows[(row["source"], row["id"])] = row
            pending = []
            tmp, length = item.get("open") or ("", 0)
            found.open_shard = OpenState(str(tmp), int(length)) if tmp else None
            found.commits += 1
        else:
            break
    return found


class Journal:
    """Appends commits to the journal of `store_dir`; each commit is durable when `commit` returns.

    A journal starts afresh with `carried` (rows of an earlier, interrupted run that still hold,
    and the shard in progress they lie in) as its first commit, written to a temporary file and
    renamed into place: a torn line of the earlier run is gone, and no commit is ever lost.
    """

    def __init__(
        self,
        store_dir: Path,
        carried: Iterable[tuple[Any, ...]] = (),
        open_shard: OpenState | None = None,
    ):
        self.path = journal_path(store_dir)
        self.commits = 0
        self.size = 0  # bytes up to the end of the last commit line: a failed commit is cut back to it
        self.last: OpenState | None = None  # the shard in progress as the last durable commit names it
        self.fd = -1
        tmp = self.path.with_name(self.path.name + ".tmp")
        # A full or read-only store names the journal, not its temporary name (photoprep.core.errors).
        with storage_path(self.path, aliases=(str(tmp),)):
            try:
                self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
                carried = list(carried)
                if carried or open_shard is not None:
                    self.commit(carried, open_shard)
                else:
                    os.fsync(self.fd)
                os.replace(tmp, self.path)
            except BaseException:
                self.close()
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            fsync_directory(self.path.parent)
        _reserve(reserve_path(store_dir), RESERVE_BYTES)

    def commit(self, rows: Iterable[tuple[Any, ...]], open_shard: OpenState | None) -> None:
        """Append `rows` (values in `JOURNAL_FIELDS` order) and a commit line; fsync.

        A commit that fails (a full disk) is cut off the file, so that a later one can follow it.
        """
        lines = [json.dumps(list(r), ensure_ascii=False, separators=(",", ":")) for r in rows]
        mark = [open_shard.tmp_name, open_shard.length] if open_shard is not None else None
        lines.append(json.dumps({"commit": self.commits + 1, "open": mark}))
        data = ("\n".join(lines) + "\n").encode()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.commits += 1
        self.size += len(data)
        self.last = open_shard

    def release_reserve(self) -> None:
        """Give back the room kept for a last commit on a full disk (`RESERVE_BYTES`). Best effort:
        a folder that went read-only keeps it, and the fault that brought us here is the one to report."""
        with contextlib.suppress(OSError):
            reserve_path(self.path.parent).unlink()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reserve(path: Path, size: int) -> None:
    """Allocate `size` bytes at `path`, if the disk has them (a nearly full disk goes on without)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def reserve_path(store_dir: Path) -> Path:
    return Path(store_dir) / RESERVE_NAME


def remove_journal(store_dir: Path) -> None:
    """Forget an interrupted run's commits (its table has been written), and the journal's reserve."""
    for path in (journal_path(store_dir), reserve_path(store_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
