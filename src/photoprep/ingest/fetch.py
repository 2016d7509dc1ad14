"""The concurrent fetcher: every record's URL into the source's blob store, one status row each.

A record's `url` is an http(s) URL, a ``file://`` URL, or a path relative to the source folder.
Bytes go into the sharded store (`photoprep.store`), never into files named after ids. Every
record gets a row: ``status`` ok or failed, with a ``reason`` such as ``http_404`` or
``timeout``; a failed fetch is data, not an exception.

HTTP runs on one asyncio event loop with aiohttp: at most `concurrency` requests in flight and
`per_host` connections per host; connect and read timeouts apart, and a wall-clock
`request_deadline` per request that a slow drip cannot reset (reason ``deadline``); retries
with exponential backoff and seeded jitter on connection errors, timeouts, truncated bodies,
408, 429 and 5xx. A 429 or 503 pauses the whole host (Retry-After honoured, capped at
`backoff_max`; a negative or unreadable one counts as none), so the pool backs off together
instead of hammering a rate-limited CDN one request at a time.

The byte limit `max_bytes` holds on what a body decodes to: Content-Encoding gzip, deflate and
br are decoded as the bytes arrive (`photoprep.ingest.encoding`), in steps that never produce
more than the room left, so a small compressed body cannot expand in memory (``too_large``).

A per-host circuit breaker: when the first `host_down_after` answers of a host are failures
of one kind (refused or unresolvable, timeouts, or one 4xx status) and none succeeded, the host
is cut off: requests in flight to it are cancelled and every id left gets ``host_unreachable``
(or ``host_all_<status>``), which a later run fetches again. `FetchResult.hosts_down` says
which host, and the error as the system gave it. A host that answered anything else is never
cut off this way.

Redirects are followed by hand, up to `max_redirects`, and only to the same host: the same
hostname and port, where an upgrade from http to https on the default ports counts as the
same host. Another host is refused (``redirect_cross_host``) unless cross-host redirects are
allowed. Local files (relative paths and ``file://`` URLs) are read only from inside the source
folder, symlinks resolved (``path_outside_source``), and only when they are regular files.

Bodies are hashed (sha256) and written to the store from the event loop's thread, in record
order (sorted by source and id) whatever order the responses arrive in, so two runs that
fetch the same bytes write the same shards and the same table.

Resume at id granularity: every `commit_seconds` or `commit_every` ids, the shard in progress
is fsynced and the rows finished so far (a prefix in record order) go into the journal
(`photoprep.ingest.journal`). A run picks up the journal of an interrupted one and the table
of a finished one: rows that are ok, for the same url, whose blob the (verified) store holds
are reused without a request, keeping their columns; everything else is fetched again. Ctrl-C
and SIGTERM stop the run after a last commit (`FetchResult.interrupted`).

Why one module
    One event loop owns the per-host state (slots, pauses, backoff, the breaker) that HTTP,
    file and local-path targets share, the order in which bodies reach the store, and the
    commits that make that order resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import errno
import hashlib
import math
import os
import random
import signal
import stat
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import brotli
import pandas as pd
from yarl import URL

from photoprep.console import Progress, count
from photoprep.errors import UserError
from photoprep.ingest.encoding import Decoder, TooLarge
from photoprep.ingest.journal import Journal, read_journal, remove_journal
from photoprep.ingest.sniff import sniff_mime
from photoprep.ingest.store import ShardWriter
from photoprep.io import write_table
from photoprep.params import DownloadParams

KEY = ("source", "id")
RESULT_COLUMNS = ("status", "reason", "http_status", "attempts", "sha256", "size", "mime", "shard", "offset")
_INT_COLUMNS = ("http_status", "attempts", "size", "offset")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OK = frozenset({200, 203})
_PAUSE_HOST = frozenset({429, 503})
_RETRY_REASONS = frozenset({"timeout", "connect_error", "truncated_body", "bad_response", "read_error"})
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP})
_NETWORK_KINDS = frozenset({"connect_error", "timeout"})  # what the breaker calls host_unreachable
_MIB = 2**20
_CHUNK = 64 * 1024
_PROGRESS_EVERY = 64  # progress updates per this many images: one call per image costs more than it shows


@dataclass(slots=True)
class Outcome:
    """What one attempt (or a reused row) gave: a body, or the reason there is none."""

    reason: str = ""
    http_status: int = 0
    body: bytes | None = None
    retry_after: float | None = None
    detail: str = ""  # the error as the system or the server gave it

    @property
    def retryable(self) -> bool:
        """True for faults that may go away: the network, the server's load, rate limits."""
        if self.reason in _RETRY_REASONS:
            return True
        return self.reason.startswith("http_") and (self.http_status >= 500 or self.http_status in (408, 429))


@dataclass(frozen=True, slots=True)
class Target:
    """Where a record's bytes come from: an http(s) URL, a local file, or nowhere (`reason`).

    A local file must resolve (symlinks followed) to a path inside `root`, the source folder.
    """

    url: URL | None = None
    path: str | None = None
    reason: str = ""
    root: str = ""


@dataclass(frozen=True)
class HostDown:
    """A host the circuit breaker cut off: what it answered, and how many ids it left."""

    host: str
    reason: str  # host_unreachable | host_all_<status>
    detail: str  # the error as the system gave it
    answers: int
    left: int

    def line(self, stage: str) -> str:
        check = (
            "is the url template right?"
            if self.reason.startswith("host_all_")
            else ("is the network up? is the url template right?")
        )
        return (
            f"{stage}: host {self.host} is down: its first {self.answers} answers were all "
            f"'{self.detail}' and none succeeded; {count(self.left)} ids left as {self.reason} "
            f"(a re-run tries them again); {check}"
        )


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
        return (
            f"{stage}: interrupted by {self.interrupted}: kept {count(self.kept)} of "
            f"{count(self.requested + self.reused)} ids (shards and status rows committed); "
            "run it again to resume"
        )

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


# -- targets -----------------------------------------------------------------------------


def target_of(url: Any, base_dir: Path) -> Target:
    """Classify a record's `url`: http(s), file://, or a path relative to `base_dir`.

    Local files (file:// and paths) must lie inside `base_dir`, the source folder.
    """
    if not isinstance(url, str) or not url.strip():
        return Target(reason="bad_url")
    if url.startswith(("http://", "https://")):  # the common case, without urlsplit's cost
        return _http_target(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _http_target(url)
    if scheme == "file":
        return _file_url_target(url, base_dir)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, i.e. a path
        return Target(reason="bad_url")
    return _relative_target(url, base_dir)


def _http_target(url: str) -> Target:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 -- an out-of-range port raises only when read
    except (ValueError, TypeError):
        return Target(reason="bad_url")
    if not parsed.host:
        return Target(reason="bad_url")
    return Target(url=parsed)


def _local_target(full: str, base_dir: Path) -> Target:
    """A local path, refused unless it lies inside the source folder (lexically here; symlinks at read)."""
    base = os.path.normpath(os.path.abspath(base_dir))
    full = os.path.normpath(os.path.abspath(full))
    if not full.startswith(base.rstrip(os.sep) + os.sep):
        return Target(reason="path_outside_source")
    return Target(path=full, root=base)


def _file_url_target(url: str, base_dir: Path) -> Target:
    """A file:// URL inside the source folder; a '..' segment after percent-decoding is refused."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return Target(reason="bad_url")
    path = unquote(parts.path)
    if "\0" in path or ".." in path.split("/"):
        return Target(reason="bad_url")
    return _local_target(path, base_dir)


def _relative_target(url: str, base_dir: Path) -> Target:
    """A percent-encoded path relative to the source folder, which it must not leave."""
    path = unquote(url)
    if "\0" in path:
        return Target(reason="bad_url")
    return _local_target(os.path.join(os.path.abspath(base_dir), path), base_dir)


def same_host(origin: URL, to: URL) -> bool:
    """Same hostname and port; http -> https on the default ports is the same host too."""
    if origin.host != to.host:
        return False
    if origin.port == to.port:
        return True
    return (
        origin.scheme == "http"
        and to.scheme == "https"
        and origin.explicit_port in (None, 80)
        and to.explicit_port in (None, 443)
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or bad.

    A negative number of seconds is not a valid header: None, so the usual backoff applies. A
    date in the past means now (0).
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # '-0000': a date in UTC with no zone named
            when = when.replace(tzinfo=datetime.UTC)
        now = time.time() if now is None else now
        seconds = max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


# -- local files -------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip(os.sep) + os.sep)


def _read_local(path: str, root: str, max_bytes: int) -> Outcome:
    """The bytes of a regular file inside `root` (symlinks resolved), or why not; never blocks on a FIFO."""
    real = os.path.realpath(path)
    if root and not _inside(real, os.path.realpath(root)):
        return Outcome(reason="path_outside_source")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        return Outcome(reason=_os_reason(exc))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Outcome(reason="not_found")
        if info.st_size > max_bytes:
            return Outcome(reason="too_large")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        return Outcome(reason=_os_reason(exc))
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return Outcome(reason="too_large")
    return Outcome(body=data)


def _os_reason(exc: OSError) -> str:
    if exc.errno in _NOT_FOUND_ERRNOS:
        return "not_found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission_denied"
    return "read_error"


# -- the fetcher -------------------------------------------------------------------------


@dataclass(slots=True)
class _HostState:
    """What the breaker knows of a host: the kind of its first answers, and whether it is cut off."""

    kind: str = ""  # the failure kind of every answer so far; "alive" once anything else came back
    answers: int = 0
    detail: str = ""
    down: HostDown | None = None
    left: int = 0  # ids that ended with the host's breaker reason
    in_flight: set[asyncio.Task] = field(default_factory=set)


def _failure_kind(outcome: Outcome) -> str:
    """The breaker's kind of an answer: connect_error, timeout, http_<4xx>, or '' (anything else)."""
    if outcome.body is not None:
        return ""
    if outcome.reason in _NETWORK_KINDS:
        return outcome.reason
    status = outcome.http_status
    if outcome.reason == f"http_{status}" and 400 <= status < 500 and status not in (408, 429):
        return outcome.reason
    return ""


class _Fetcher:
    """The state one run shares: the session, the request slots, the per-host pauses and breakers."""

    def __init__(
        self,
        p: DownloadParams,
        session: aiohttp.ClientSession,
        allow_cross_host: bool,
    ):
        self.p = p
        self.session = session
        self.allow_cross_host = allow_cross_host
        self.slots = asyncio.Semaphore(p.concurrency)
        self.rng = random.Random(p.seed)
        self.not_before: dict[str, float] = {}  # host -> loop time before which nobody asks it
        self.hosts: dict[str, _HostState] = {}
        self.down_origins: dict[str, _HostState] = {}  # 'https://cdn.heobs.org' -> a host cut off
        self.loop = asyncio.get_running_loop()

    def cut_off(self, url: str) -> _HostState | None:
        """The state of the host of `url` when it is cut off, found without parsing the URL.

        Once a host is down, every id left for it ends here: a million ids cost a string
        slice each, not a URL parse.
        """
        if not self.down_origins or not url.startswith(("http://", "https://")):
            return None
        end = url.find("/", 8)
        return self.down_origins.get(url if end < 0 else url[:end])

    async def fetch(self, target: Target) -> tuple[Outcome, int]:
        """Fetch one target with retries; the final outcome and the number of attempts."""
        if target.reason:
            return Outcome(reason=target.reason), 0
        host = f"{target.url.host}:{target.url.port}" if target.url is not None else ""
        state = self.hosts.setdefault(host, _HostState()) if host else None
        attempts = 0
        while True:
            if state is not None and state.down is not None:
                return Outcome(reason=state.down.reason), attempts
            attempts += 1
            if target.url is not None:
                assert state is not None
                outcome = await self._attempt_http(target.url, host, state)
                if outcome is None:  # cut off while in flight
                    assert state.down is not None
                    return Outcome(reason=state.down.reason), attempts
                self._observe(host, state, outcome, target.url)
            else:
                assert target.path is not None  # a target is a URL or a local path
                async with self.slots:
                    outcome = await asyncio.to_thread(_read_local, target.path, target.root, self.p.max_bytes)
            if outcome.body is not None or not outcome.retryable:
                return outcome, attempts
            delay = self._backoff(attempts, outcome.retry_after)
            if outcome.http_status in _PAUSE_HOST:
                # The host is overloaded or rate-limiting: every request to it waits, not just this one.
                pause_until = self.loop.time() + delay
                self.not_before[host] = max(self.not_before.get(host, 0.0), pause_until)
            if attempts > self.p.retries:
                return outcome, attempts
            await asyncio.sleep(delay)

    def _observe(self, host: str, state: _HostState, outcome: Outcome, url: URL) -> None:
        """Count an answer for the breaker; cut the host off after host_down_after alike failures."""
        if state.kind == "alive" or state.down is not None or not self.p.host_down_after:
            return
        kind = _failure_kind(outcome)
        if not kind or (state.kind and kind != state.kind):
            state.kind = "alive"
            return
        state.kind = kind
        state.answers += 1
        state.detail = state.detail or outcome.detail or outcome.reason
        if state.answers >= self.p.host_down_after:
            reason = "host_unreachable" if kind in _NETWORK_KINDS else f"host_all_{outcome.http_status}"
            state.down = HostDown(host, reason, state.detail, state.answers, 0)
            self.down_origins[str(url.origin())] = state
            for task in list(state.in_flight):
                task.cancel()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next try: Retry-After when the server gave one, else 2^n steps."""
        if retry_after is not None:
            return min(retry_after, self.p.backoff_max)
        step = min(self.p.backoff_max, self.p.backoff_base * 2.0 ** (attempt - 1))
        # Jitter in [step/2, step): retries spread out, yet never collapse to no wait at all.
        return step * (0.5 + 0.5 * self.rng.random())

    async def _attempt_http(self, url: URL, host: str, state: _HostState) -> Outcome | None:
        """One try, redirects included, once the host's pause (if any) is over; None if cut off."""
        while True:
            await self._wait_for_host(host)
            async with self.slots:
                if state.down is not None:
                    return None
                if self.not_before.get(host, 0.0) > self.loop.time():
                    continue  # the host was paused while this request queued for a slot
                task = asyncio.ensure_future(self._try_get(url))
                state.in_flight.add(task)
                try:
                    return await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if state.down is not None and current is not None and not current.cancelling():
                        return None  # the breaker cancelled it, not a stop of the run
                    raise
                finally:
                    state.in_flight.discard(task)

    async def _try_get(self, url: URL) -> Outcome:
        """`_get` within the request deadline, with the exceptions of a failed try turned into reasons."""
        try:
            async with asyncio.timeout(self.p.request_deadline) as deadline:
                return await self._get(url)
        except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
            if deadline.expired():
                return Outcome(
                    reason="deadline", detail=f"no full answer within {self.p.request_deadline:g} s"
                )
            return Outcome(reason="timeout", detail=f"no answer within {self.p.read_timeout:g} s (timeout)")
        except aiohttp.ClientPayloadError as exc:
            return Outcome(reason="truncated_body", detail=str(exc))
        except aiohttp.InvalidURL:
            return Outcome(reason="bad_url")
        except (aiohttp.ClientConnectionError, OSError) as exc:
            return Outcome(reason="connect_error", detail=_system_error(exc))
        except aiohttp.ClientResponseError as exc:
            return Outcome(reason="bad_response", detail=str(exc))
        except ValueError:
            return Outcome(reason="bad_url")

    async def _wait_for_host(self, host: str) -> None:
        while True:
            wait = self.not_before.get(host, 0.0) - self.loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _get(self, url: URL) -> Outcome:
        """GET `url`, following same-host redirects by hand; the body or why there is none."""
        origin = url
        status = 0
        for _ in range(self.p.max_redirects + 1):
            async with self.session.get(url, allow_redirects=False) as resp:
                status = resp.status
                if status in _REDIRECTS:
                    next_url = self._redirect_target(origin, url, resp.headers.get("Location"))
                    if isinstance(next_url, str):
                        return Outcome(reason=next_url, http_status=status)
                    url = next_url
                    continue
                if status not in _OK:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    detail = f"HTTP {status} {resp.reason or ''}".strip()
                    return Outcome(f"http_{status}", status, retry_after=retry_after, detail=detail)
                return await self._read_body(resp)
        return Outcome(reason="too_many_redirects", http_status=status)

    def _redirect_target(self, origin: URL, current: URL, location: str | None) -> URL | str:
        """The next URL of a redirect, or the reason it is not followed."""
        if not location:
            return "bad_redirect"
        try:
            to = current.join(URL(location))
            to.port  # noqa: B018 -- raises on a bad port
        except (ValueError, TypeError):
            return "bad_redirect"
        if to.scheme not in ("http", "https") or not to.host:
            return "bad_redirect"
        if not self.allow_cross_host and not same_host(origin, to):
            return "redirect_cross_host"
        return to

    async def _read_body(self, resp: aiohttp.ClientResponse) -> Outcome:
        """The decoded body, refused as soon as it passes max_bytes (before reading, if announced)."""
        limit = self.p.max_bytes
        length = resp.content_length
        if length is not None and length > limit:
            return Outcome(reason="too_large", http_status=resp.status)
        try:
            decoder = Decoder(resp.headers.get("Content-Encoding", ""))
        except ValueError as exc:
            return Outcome(reason="bad_encoding", http_status=resp.status, detail=str(exc))
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                for part in decoder.feed(chunk, limit - total):
                    total += len(part)
                    chunks.append(part)
            for part in decoder.finish(limit - total):
                total += len(part)
                chunks.append(part)
        except TooLarge:
            return Outcome(reason="too_large", http_status=resp.status)
        except (zlib.error, brotli.error, ValueError) as exc:
            return Outcome(reason="bad_encoding", http_status=resp.status, detail=str(exc))
        return Outcome(http_status=resp.status, body=b"".join(chunks))


def _system_error(exc: BaseException) -> str:
    """The error as the system gave it: 'Connect call failed ...', 'Name or service not known'."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError):
        return os_error.strerror or str(os_error)
    return str(exc) or type(exc).__name__


# -- the run -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    """The result columns of one record, before shard and offset are known."""

    status: str
    reason: str
    http_status: int
    attempts: int
    sha256: str = ""
    size: int = 0
    mime: str = ""
    shard: str = ""
    offset: int = 0


def _row_of(outcome: Outcome, attempts: int) -> tuple[_Row, str]:
    """The result row of an outcome, and the sha256 of its body ('' when none)."""
    body = outcome.body
    if body is None:
        return _Row("failed", outcome.reason, outcome.http_status, attempts), ""
    sha256 = hashlib.sha256(body).hexdigest()
    return _Row("ok", "", outcome.http_status, attempts, sha256, len(body), sniff_mime(body)), sha256


class _InOrder:
    """Hands bodies to the store in target order, whatever order the responses arrive in.

    The shards' layout then depends on the records, not on the network's timing. Bodies that
    arrive ahead of a slow one wait in memory (up to `memory_bytes`), then in a temporary file
    in the store folder, removed at `close`.
    """

    def __init__(self, writer: ShardWriter, memory_bytes: int):
        self.writer = writer
        self.memory_bytes = memory_bytes
        self.next = 0
        self.waiting: dict[
            int, tuple[str, bytes | None, int, int] | None
        ] = {}  # sha, body | spilled at, size
        self.held = 0
        self.spill_fd = -1
        self.spill_path = ""
        self.spill_end = 0
        self.spilled = 0  # bodies waiting in the spill file

    def put(self, index: int, sha256: str, body: bytes | None) -> None:
        """The body of target `index` (None when it failed): stored once all before it are."""
        if index == self.next:
            if body is not None:
                self.writer.add(body, sha256)
            self.next += 1
            if self.waiting:
                self._drain()
        elif body is None:
            self.waiting[index] = None
        elif self.held + len(body) <= self.memory_bytes:
            self.waiting[index] = (sha256, body, 0, len(body))
            self.held += len(body)
        else:
            self.waiting[index] = (sha256, None, self._spill(body), len(body))
            self.spilled += 1

    def close(self) -> None:
        if self.spill_fd >= 0:
            os.close(self.spill_fd)
            os.unlink(self.spill_path)
            self.spill_fd = -1

    def _drain(self) -> None:
        while self.next in self.waiting:
            item = self.waiting.pop(self.next)
            self.next += 1
            if item is None:
                continue
            sha256, body, offset, size = item
            if body is None:
                body = _read_spill(self.spill_fd, offset, size)
                self.spilled -= 1
            else:
                self.held -= size
            self.writer.add(body, sha256)
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


def _read_spill(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"spill file: short read at {offset}")
    return data


class _Committer:
    """Commits the rows stored so far, in target order, with the shard in progress: see the journal."""

    def __init__(
        self,
        journal: Journal | None,
        writer: ShardWriter,
        keys: list[tuple[str, str, str]],
        rows: dict[int, tuple[_Row, str]],
        p: DownloadParams,
    ):
        self.journal = journal
        self.writer = writer
        self.keys = keys  # (source, id, url) of each target, in target order
        self.rows = rows  # by target index
        self.every = p.commit_every
        self.seconds = p.commit_seconds
        self.done = 0
        self.bodies = 0  # bodies stored since the last commit
        self.last = time.monotonic()

    def maybe(self, upto: int, force: bool = False) -> None:
        """Commit targets [done, upto) once `commit_every` bodies or `commit_seconds` have passed.

        Failed rows cost nothing to redo, so only stored bodies count towards `commit_every`: a
        dead host's thousands of failures do not fsync the journal thousands of times.
        """
        if self.journal is None or upto <= self.done:
            return
        now = time.monotonic()
        if not force and self.bodies < self.every and now - self.last < self.seconds:
            return
        state = self.writer.commit()
        values = []
        for index in range(self.done, upto):
            row, _ = self.rows[index]
            if row.status != "ok":
                continue  # a failed row is fetched again anyway: only stored bodies need committing
            source, id_, url = self.keys[index]
            values.append(
                (
                    source,
                    id_,
                    url,
                    row.status,
                    row.reason,
                    row.http_status,
                    row.attempts,
                    row.sha256,
                    row.size,
                    row.mime,
                )
            )
        self.journal.commit(values, state)
        self.done = upto
        self.bodies = 0
        self.last = now


async def _fetch_rows(
    urls: list[str],
    base_dir: Path,
    p: DownloadParams,
    in_order: _InOrder,
    committer: _Committer,
    allow_cross_host: bool,
    bar: Progress,
) -> tuple[dict[int, tuple[_Row, str]], list[HostDown], str]:
    """Fetch every target and store the bodies in target order.

    Rows by target index, the hosts cut off, and the signal that stopped the run ('' if none).
    """
    rows = committer.rows
    if not urls:
        return rows, [], ""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout)
    connector = aiohttp.TCPConnector(limit=p.concurrency, limit_per_host=p.per_host)
    loop = asyncio.get_running_loop()
    stopped = ""
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": p.user_agent},
        # Images are compressed already: ask for the bytes as they are, and skip cookies. A server
        # that encodes anyway is decoded here, under the byte limit (`Decoder`).
        skip_auto_headers=("Accept-Encoding",),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        fetcher = _Fetcher(p, session, allow_cross_host)
        queue: Iterator[tuple[int, str]] = enumerate(urls)
        done = 0

        async def worker() -> None:
            nonlocal done
            for index, url in queue:  # one shared iterator: each target to one worker
                down = fetcher.cut_off(url)
                if down is not None and down.down is not None:
                    outcome, attempts = Outcome(reason=down.down.reason), 0
                    down.left += 1
                else:
                    target = target_of(url, base_dir)  # parsed here: a dead host's ids are never parsed
                    outcome, attempts = await fetcher.fetch(target)
                    if outcome.reason.startswith("host_") and target.url is not None:
                        fetcher.hosts[f"{target.url.host}:{target.url.port}"].left += 1
                row, sha256 = _row_of(outcome, attempts)
                rows[index] = (row, sha256)
                in_order.put(index, sha256, outcome.body)
                committer.bodies += outcome.body is not None
                committer.maybe(in_order.next)
                done += 1
                if done % _PROGRESS_EVERY == 0:
                    bar.update(_PROGRESS_EVERY)

        # Twice as many workers as request slots: a worker sleeping through a backoff holds
        # no slot, so the others keep the slots busy.
        tasks = [asyncio.ensure_future(worker()) for _ in range(min(len(urls), 2 * p.concurrency))]

        def stop(name: str) -> None:
            nonlocal stopped
            stopped = stopped or name
            for task in tasks:
                task.cancel()

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
        bar.update(done % _PROGRESS_EVERY)
    down = [
        HostDown(host, s.down.reason, s.down.detail, s.down.answers, s.left)
        for host, s in sorted(fetcher.hosts.items())
        if s.down is not None
    ]
    return rows, down, stopped


def _reusable(
    records: pd.DataFrame,
    earlier: dict[tuple[str, str], Any],
    writer: ShardWriter,
) -> dict[int, _Row]:
    """Rows of an earlier run still good for `records` (by position): ok, same url, blob in the store."""
    reused: dict[int, _Row] = {}
    if not earlier:
        return reused
    for position, (source, id_, url) in enumerate(
        zip(records["source"], records["id"], records["url"], strict=True)
    ):
        row = earlier.get((source, id_))
        if row is None or row["status"] != "ok" or row["url"] != url or not writer.holds(str(row["sha256"])):
            continue
        reused[position] = _Row(
            "ok",
            "",
            int(row["http_status"]),
            int(row["attempts"]),
            str(row["sha256"]),
            int(row["size"]),
            str(row["mime"]),
        )
    return reused


def _earlier_rows(previous: pd.DataFrame | None, journal_rows: dict[tuple[str, str], Any]) -> dict:
    """Rows of the last finished table, overridden by those an interrupted run committed since."""
    needed = {*KEY, "url", *RESULT_COLUMNS}
    earlier: dict[tuple[str, str], Any] = {}
    if previous is not None and not previous.empty and needed <= set(previous.columns):
        ok = previous[previous["status"] == "ok"]
        columns = ["source", "id", "url", "status", "http_status", "attempts", "sha256", "size", "mime"]
        for values in zip(*(ok[c] for c in columns), strict=True):
            row = dict(zip(columns, values, strict=True))
            earlier[(row["source"], row["id"])] = row
    earlier.update(journal_rows)
    return earlier


def _check_records(records: pd.DataFrame) -> None:
    missing = [c for c in (*KEY, "url") if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    clash = [c for c in RESULT_COLUMNS if c in records.columns]
    if clash:
        raise ValueError(f"records already have result column(s) {clash}")


def _table(records: pd.DataFrame, rows: list[_Row]) -> pd.DataFrame:
    """Records with their result columns: key first, carried columns, results; sorted by key."""
    carried = [c for c in records.columns if c not in KEY]
    table = records[[*KEY, *carried]].reset_index(drop=True).copy()
    for column in RESULT_COLUMNS:
        values = [getattr(row, column) for row in rows]
        table[column] = pd.Series(values, dtype="int64" if column in _INT_COLUMNS else None)
    table = table.sort_values(list(KEY), kind="mergesort").reset_index(drop=True)
    return table


def download(
    records: pd.DataFrame,
    store_dir: Path,
    p: DownloadParams,
    *,
    base_dir: Path,
    table_path: Path | None = None,
    previous: pd.DataFrame | None = None,
    allow_cross_host: bool | None = None,
    progress: bool = True,
) -> FetchResult:
    """Fetch every record's `url` into the blob store in `store_dir`; one result row per record.

    Columns: `source`, `id`, the other record columns unchanged, then `status` (ok | failed),
    `reason` ('' when ok), `http_status` (0 if none), `attempts` (requests made for the row,
    kept when the row is reused), `sha256`, `size`, `mime` (sniffed), `shard`, `offset`. Rows
    sorted by (source, id). Relative paths and file:// URLs are read from disk, from inside
    `base_dir`. `allow_cross_host` overrides `p.allow_cross_host_redirects`.

    Progress is committed to the store's journal as the run goes; with `table_path` the table is
    written there (durably) before the journal is removed, so no kill loses a committed row.
    Interrupted by SIGINT or SIGTERM, it returns at once with `interrupted` set, the table of
    the rows kept so far, and writes nothing more.
    """
    _check_records(records)
    # Sorted first: rows come out by key, and bodies are stored in this order (deterministic shards).
    records = records.sort_values(list(KEY), kind="mergesort").reset_index(drop=True)
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    cross_host = p.allow_cross_host_redirects if allow_cross_host is None else allow_cross_host
    committed = read_journal(store_dir)
    writer = ShardWriter(store_dir, p.shard_mb * _MIB, resume=committed.open_shard)
    notes = list(writer.notes)
    reused = _reusable(records, _earlier_rows(previous, committed.rows), writer)
    all_keys = list(
        zip(records["source"].tolist(), records["id"].tolist(), records["url"].tolist(), strict=True)
    )
    positions = [position for position in range(len(records)) if position not in reused]
    keys = [all_keys[position] for position in positions]
    urls = [url for _, _, url in keys]
    carried = [
        (*all_keys[i], row.status, row.reason, row.http_status, row.attempts, row.sha256, row.size, row.mime)
        for i, row in sorted(reused.items())
        if all_keys[i][:2] in committed.rows
    ]
    journal = Journal(store_dir, carried, writer.commit())
    rows: dict[int, tuple[_Row, str]] = {}
    committer = _Committer(journal, writer, keys, rows, p)
    in_order = _InOrder(writer, p.shard_mb * _MIB)
    sources = records["source"].unique()
    desc = f"fetch {sources[0]}" if len(sources) == 1 else "fetch"
    try:
        with Progress(len(urls), desc, enabled=progress) as bar:
            rows, down, stopped = asyncio.run(
                _fetch_rows(urls, base_dir, p, in_order, committer, cross_host, bar)
            )
        if stopped:
            committer.maybe(in_order.next, force=True)
    except BaseException:
        in_order.close()
        writer.abandon()
        journal.close()
        raise
    in_order.close()
    if stopped:
        writer.abandon()
        journal.close()
        kept = {
            **reused,
            **{positions[i]: rows[i][0] for i in range(committer.done) if rows[i][0].status == "ok"},
        }
        order = sorted(kept)
        partial = _table(records.iloc[order].reset_index(drop=True), [kept[i] for i in order])
        return FetchResult(partial, len(urls), len(reused), down, notes, stopped, len(kept))
    refs = writer.flush()
    journal.close()
    out: list[_Row] = []
    by_position = dict(zip(positions, range(len(positions)), strict=True))
    for position in range(len(records)):
        row = reused.get(position)
        if row is None:
            row, sha256 = rows[by_position[position]]
        else:
            sha256 = row.sha256
        if sha256:
            ref = refs[sha256]
            row.shard, row.offset = ref.shard, ref.offset
        out.append(row)
    table = _table(records, out)
    if table_path is not None:
        write_table(table, table_path, durable=True)
    remove_journal(store_dir)
    return FetchResult(table, len(urls), len(reused), down, notes)


def fetch_all(
    records: pd.DataFrame,
    store_dir: Path,
    p: DownloadParams,
    *,
    base_dir: Path,
    previous: pd.DataFrame | None = None,
    allow_cross_host: bool | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """`download`'s table: every record's row (see `download`)."""
    return download(
        records,
        store_dir,
        p,
        base_dir=base_dir,
        previous=previous,
        allow_cross_host=allow_cross_host,
        progress=progress,
    ).table


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
