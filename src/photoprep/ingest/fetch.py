"""The concurrent fetcher: every record's URL into the source's blob store, one status row each.

A record's `url` is an http(s) URL, a ``file://`` URL, or a path relative to the source folder.
Bytes go into the sharded store (`photoprep.store`), never into files named after ids. Every
record gets a row: ``status`` ok or failed, with a ``reason`` such as ``http_404`` or
``timeout``; a failed fetch is data, not an exception.

HTTP runs on one asyncio event loop with aiohttp: at most `concurrency` requests in flight and
`per_host` connections per host; connect and read timeouts apart; retries with exponential
backoff and seeded jitter on connection errors, timeouts, truncated bodies, 408, 429 and 5xx.
A 429 or 503 pauses the whole host (Retry-After honoured, capped at `backoff_max`), so the
pool backs off together instead of hammering a rate-limited CDN one request at a time.

Redirects are followed by hand, up to `max_redirects`, and only to the same host: the same
hostname and port, where an upgrade from http to https on the default ports counts as the
same host. Another host is refused (``redirect_cross_host``) unless cross-host redirects are
allowed.

Bodies are hashed (sha256) and written to the store from the event loop's thread, in record
order (sorted by source and id) whatever order the responses arrive in, so two runs that
fetch the same bytes write the same shards and the same table.

Resume: rows of a previous table that are ok, for the same url, whose shard is still there
are reused without a request (``attempts`` 0); everything else is fetched again.

Why one module
    One event loop owns the per-host state (slots, pauses, backoff) that HTTP, file and
    local-path targets share, and the status row each of them ends in.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import errno
import hashlib
import math
import os
import random
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pandas as pd
from tqdm import tqdm
from yarl import URL

from photoprep.ingest.sniff import sniff_mime
from photoprep.ingest.store import SHARD_NAME, ShardWriter
from photoprep.params import DownloadParams

KEY = ("source", "id")
RESULT_COLUMNS = ("status", "reason", "http_status", "attempts", "sha256", "size", "mime", "shard", "offset")
_INT_COLUMNS = ("http_status", "attempts", "size", "offset")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OK = frozenset({200, 203})
_PAUSE_HOST = frozenset({429, 503})
_RETRY_REASONS = frozenset({"timeout", "connect_error", "truncated_body", "bad_response", "read_error"})
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP})
_MIB = 2**20
_PROGRESS_EVERY = 64  # bar updates per this many images: a tqdm call per image costs more than it shows


@dataclass(slots=True)
class Outcome:
    """What one attempt (or a reused row) gave: a body, or the reason there is none."""

    reason: str = ""
    http_status: int = 0
    body: bytes | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        """True for faults that may go away: the network, the server's load, rate limits."""
        if self.reason in _RETRY_REASONS:
            return True
        return self.reason.startswith("http_") and (self.http_status >= 500 or self.http_status in (408, 429))


@dataclass(frozen=True, slots=True)
class Target:
    """Where a record's bytes come from: an http(s) URL, a local file, or nowhere (`reason`)."""

    url: URL | None = None
    path: str | None = None
    reason: str = ""


# -- targets -----------------------------------------------------------------------------


def target_of(url: Any, base_dir: Path) -> Target:
    """Classify a record's `url`: http(s), file://, or a path relative to `base_dir`."""
    if not isinstance(url, str) or not url.strip():
        return Target(reason="bad_url")
    if url.startswith(("http://", "https://")):  # the common case, without urlsplit's cost
        return _http_target(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _http_target(url)
    if scheme == "file":
        return _file_url_target(url)
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


def _file_url_target(url: str) -> Target:
    """A file:// URL; a '..' segment after percent-decoding is refused (ids can hold '%2F..')."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return Target(reason="bad_url")
    path = unquote(parts.path)
    if "\0" in path or ".." in path.split("/"):
        return Target(reason="bad_url")
    return Target(path=os.path.normpath(path))


def _relative_target(url: str, base_dir: Path) -> Target:
    """A percent-encoded path relative to the source folder, which it must not leave."""
    path = unquote(url)
    if "\0" in path:
        return Target(reason="bad_url")
    base = os.path.normpath(os.path.abspath(base_dir))
    # Checked lexically: ids cannot make symlinks, and a source's owner may link a folder in.
    full = os.path.normpath(os.path.join(base, path))
    if not full.startswith(base.rstrip(os.sep) + os.sep):
        return Target(reason="path_outside_source")
    return Target(path=full)


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
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent or bad."""
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
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# -- local files -------------------------------------------------------------------------


def _read_local(path: str, max_bytes: int) -> Outcome:
    """The bytes of a regular file, or why not; never blocks on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
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


class _Fetcher:
    """The state one run shares: the session, the request slots, the per-host pauses."""

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
        self.loop = asyncio.get_running_loop()

    async def fetch(self, target: Target) -> tuple[Outcome, int]:
        """Fetch one target with retries; the final outcome and the number of attempts."""
        if target.reason:
            return Outcome(reason=target.reason), 0
        host = f"{target.url.host}:{target.url.port}" if target.url is not None else ""
        attempts = 0
        while True:
            attempts += 1
            if target.url is not None:
                outcome = await self._attempt_http(target.url, host)
            else:
                assert target.path is not None  # a target is a URL or a local path
                async with self.slots:
                    outcome = await asyncio.to_thread(_read_local, target.path, self.p.max_bytes)
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

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next try: Retry-After when the server gave one, else 2^n steps."""
        if retry_after is not None:
            return min(retry_after, self.p.backoff_max)
        step = min(self.p.backoff_max, self.p.backoff_base * 2.0 ** (attempt - 1))
        # Jitter in [step/2, step): retries spread out, yet never collapse to no wait at all.
        return step * (0.5 + 0.5 * self.rng.random())

    async def _attempt_http(self, url: URL, host: str) -> Outcome:
        """One try, redirects included, once the host's pause (if any) is over."""
        while True:
            await self._wait_for_host(host)
            async with self.slots:
                if self.not_before.get(host, 0.0) > self.loop.time():
                    continue  # the host was paused while this request queued for a slot
                return await self._try_get(url)

    async def _try_get(self, url: URL) -> Outcome:
        """`_get`, with the exceptions of a failed try turned into reasons."""
        try:
            return await self._get(url)
        except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors
            return Outcome(reason="timeout")
        except aiohttp.ClientPayloadError:
            return Outcome(reason="truncated_body")
        except aiohttp.InvalidURL:
            return Outcome(reason="bad_url")
        except (aiohttp.ClientConnectionError, OSError):
            return Outcome(reason="connect_error")
        except aiohttp.ClientResponseError:
            return Outcome(reason="bad_response")
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
                    return Outcome(reason=f"http_{status}", http_status=status, retry_after=retry_after)
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
        """The whole body, unless it is larger than max_bytes (refused before reading if announced)."""
        limit = self.p.max_bytes
        length = resp.content_length
        if length is not None:
            if length > limit:
                return Outcome(reason="too_large", http_status=resp.status)
            return Outcome(http_status=resp.status, body=await resp.read())
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            if total > limit:
                return Outcome(reason="too_large", http_status=resp.status)
            chunks.append(chunk)
        return Outcome(http_status=resp.status, body=b"".join(chunks))


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


async def _fetch_rows(
    targets: list[tuple[int, Target]],
    p: DownloadParams,
    writer: ShardWriter,
    allow_cross_host: bool,
    bar: tqdm,
) -> dict[int, tuple[_Row, str]]:
    """Fetch every (row position, target) and store the bodies in target order; rows by position."""
    rows: dict[int, tuple[_Row, str]] = {}
    if not targets:
        return rows
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout)
    connector = aiohttp.TCPConnector(limit=p.concurrency, limit_per_host=p.per_host)
    in_order = _InOrder(writer, p.shard_mb * _MIB)
    try:
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": p.user_agent},
            # Images are compressed already: ask for the bytes as they are, and skip cookies.
            skip_auto_headers=("Accept-Encoding",),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session:
            fetcher = _Fetcher(p, session, allow_cross_host)
            queue: Iterator[tuple[int, tuple[int, Target]]] = enumerate(targets)
            done = 0

            async def worker() -> None:
                nonlocal done
                for index, (position, target) in queue:  # one shared iterator: each target to one worker
                    outcome, attempts = await fetcher.fetch(target)
                    row, sha256 = _row_of(outcome, attempts)
                    rows[position] = (row, sha256)
                    in_order.put(index, sha256, outcome.body)
                    done += 1
                    if done % _PROGRESS_EVERY == 0:
                        bar.update(_PROGRESS_EVERY)

            # Twice as many workers as request slots: a worker sleeping through a backoff holds
            # no slot, so the others keep the slots busy.
            n_workers = min(len(targets), 2 * p.concurrency)
            await asyncio.gather(*(worker() for _ in range(n_workers)))
            bar.update(done % _PROGRESS_EVERY)
    finally:
        in_order.close()
    return rows


def _reusable(records: pd.DataFrame, previous: pd.DataFrame | None, store_dir: Path) -> dict[int, _Row]:
    """Rows of `previous` still good for `records` (by position): ok, same url, shard present."""
    needed = {*KEY, "url", *RESULT_COLUMNS}
    if previous is None or previous.empty or not needed <= set(previous.columns):
        return {}
    ok = previous[previous["status"] == "ok"]
    by_key = {(row.source, row.id): row for row in ok.itertuples(index=False)}
    present: dict[str, bool] = {}
    reused: dict[int, _Row] = {}
    for position, (source, id_, url) in enumerate(
        zip(records["source"], records["id"], records["url"], strict=True)
    ):
        row = by_key.get((source, id_))
        if row is None or row.url != url:
            continue
        shard = str(row.shard)
        if shard not in present:
            present[shard] = bool(SHARD_NAME.fullmatch(shard)) and (Path(store_dir) / shard).is_file()
        if present[shard]:
            reused[position] = _Row(
                "ok", "", int(row.http_status), 0, row.sha256, int(row.size), row.mime, shard, int(row.offset)
            )
    return reused


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
    """Fetch every record's `url` into the blob store in `store_dir`; one result row per record.

    Columns: `source`, `id`, the other record columns unchanged, then `status` (ok | failed),
    `reason` ('' when ok), `http_status` (0 if none), `attempts` (0 when reused from
    `previous`), `sha256`, `size`, `mime` (sniffed), `shard`, `offset`. Rows sorted by
    (source, id). Relative paths and file:// URLs are read from disk (relative to `base_dir`,
    which they must not leave). `allow_cross_host` overrides `p.allow_cross_host_redirects`.
    """
    _check_records(records)
    # Sorted first: rows come out by key, and bodies are stored in this order (deterministic shards).
    records = records.sort_values(list(KEY), kind="mergesort").reset_index(drop=True)
    store_dir = Path(store_dir)
    cross_host = p.allow_cross_host_redirects if allow_cross_host is None else allow_cross_host
    reused = _reusable(records, previous, store_dir)
    targets = [
        (position, target_of(url, base_dir))
        for position, url in enumerate(records["url"])
        if position not in reused
    ]
    sources = records["source"].unique()
    bar = tqdm(
        total=len(targets),
        disable=None if progress else True,  # None: off when stderr is not a terminal
        desc=f"fetch {sources[0]}" if len(sources) == 1 else "fetch",
        unit="img",
        mininterval=0.5,
    )
    with bar, ShardWriter(store_dir, p.shard_mb * _MIB) as writer:
        fetched = asyncio.run(_fetch_rows(targets, p, writer, cross_host, bar))
        refs = writer.flush()
    rows: list[_Row] = []
    for position in range(len(records)):
        if position in reused:
            rows.append(reused[position])
            continue
        row, sha256 = fetched[position]
        if sha256:
            ref = refs[sha256]
            row.shard, row.offset = ref.shard, ref.offset
        rows.append(row)
    return _table(records, rows)


def fetch_counts(table: pd.DataFrame) -> dict[str, Any]:
    """Funnel figures of a fetch table: fetched (ok rows), failed, failed_by_reason, reused
    (ok without a request this run), bytes (of ok rows) and unique_sha256 (distinct payloads)."""
    ok = table["status"] == "ok"
    failed = table.loc[~ok, "reason"].value_counts()
    return {
        "fetched": int(ok.sum()),
        "failed": int((~ok).sum()),
        "failed_by_reason": {str(reason): int(n) for reason, n in sorted(failed.items())},
        "reused": int((ok & (table["attempts"] == 0)).sum()),
        "bytes": int(table.loc[ok, "size"].sum()),
        "unique_sha256": int(table.loc[ok, "sha256"].nunique()),
    }
