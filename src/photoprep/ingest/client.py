"""The HTTP client of a download: requests with retries, per-host pauses and a per-host cut-off.

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

The cut-off (a circuit breaker per host): when the first `host_down_after` answers of a host
are failures of one kind (refused or unresolvable, timeouts, or one 4xx status) and none
succeeded, the host is cut off: requests in flight to it are cancelled and every id left gets
``host_unreachable`` (or ``host_all_<status>``), which a later run fetches again. A host that
answered anything else is never cut off this way.

Redirects are followed by hand, up to `max_redirects`, and only to the same host
(`photoprep.ingest.targets.same_host`) unless cross-host redirects are allowed. Local files
are read through `photoprep.ingest.targets.read_local` under the same request slots.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import brotli
from yarl import URL

from photoprep.core.console import count
from photoprep.core.params import DownloadParams
from photoprep.ingest.encoding import Decoder, TooLarge
from photoprep.ingest.targets import Target, read_local, same_host, target_of

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_OK = frozenset({200, 203})
_PAUSE_HOST = frozenset({429, 503})
_RETRY_REASONS = frozenset({"timeout", "connect_error", "truncated_body", "bad_response", "read_error"})
_NETWORK_KINDS = frozenset({"connect_error", "timeout"})  # what the breaker calls host_unreachable
_CHUNK = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What one attempt gave: a body, or the reason there is none."""

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


@dataclass(slots=True)
class _HostState:
    """What the breaker knows of a host: the kind of its first answers, and whether it is cut off."""

    kind: str = ""  # the failure kind of every answer so far; "alive" once anything else came back
    answers: int = 0
    detail: str = ""
    down: HostDown | None = None
    left: int = 0  # ids that ended with the host's breaker reason
    in_flight: set[asyncio.Task] = field(default_factory=set)  # the tasks asking it now
    cancelled: set[asyncio.Task] = field(default_factory=set)  # ... that the breaker cancelled


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


class Client:
    """The state one run shares: the session, the request slots, the per-host pauses and breakers.

    An async context manager: the session lives from ``async with`` to its end.
    """

    def __init__(self, p: DownloadParams, allow_cross_host: bool, base_dir: Path):
        self.p = p
        self.allow_cross_host = allow_cross_host
        self.base_dir = base_dir
        self.slots = asyncio.Semaphore(p.concurrency)
        self.rng = random.Random(p.seed)
        self.not_before: dict[str, float] = {}  # host -> loop time before which nobody asks it
        self.hosts: dict[str, _HostState] = {}
        self.down_origins: dict[str, _HostState] = {}  # 'https://cdn.heobs.org' -> a host cut off
        self.loop = asyncio.get_running_loop()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        p = self.p
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=p.concurrency, limit_per_host=p.per_host),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout
            ),
            headers={"User-Agent": p.user_agent},
            # Images are compressed already: ask for the bytes as they are, and skip cookies. A server
            # that encodes anyway is decoded here, under the byte limit (`Decoder`).
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.session is not None:
            await self.session.close()

    def hosts_down(self) -> list[HostDown]:
        """The hosts cut off, with how many ids each left."""
        return [
            HostDown(host, s.down.reason, s.down.detail, s.down.answers, s.left)
            for host, s in sorted(self.hosts.items())
            if s.down is not None
        ]

    async def fetch_url(self, url: str) -> tuple[Outcome, int]:
        """Fetch a record's url: the final outcome and the number of attempts.

        The url of a host already cut off ends at once, found without parsing it: a million ids
        left for a dead host cost a string slice each, not a URL parse.
        """
        down = self._cut_off(url)
        if down is not None and down.down is not None:
            down.left += 1
            return Outcome(reason=down.down.reason), 0
        target = target_of(url, self.base_dir)
        outcome, attempts = await self.fetch(target)
        if outcome.reason.startswith("host_") and target.url is not None:
            self.hosts[f"{target.url.host}:{target.url.port}"].left += 1
        return outcome, attempts

    def _cut_off(self, url: str) -> _HostState | None:
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
                outcome = await self._read_local(target)
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

    async def _read_local(self, target: Target) -> Outcome:
        assert target.path is not None  # a target is a URL or a local path
        async with self.slots:
            body, reason = await asyncio.to_thread(read_local, target.path, target.root, self.p.max_bytes)
        return Outcome(reason=reason, body=body)

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
                state.cancelled.add(task)
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
                # In the caller's task, not one more per request (two more turns of the loop each).
                task = asyncio.current_task()
                assert task is not None
                state.in_flight.add(task)
                try:
                    return await self._try_get(url)
                except asyncio.CancelledError:
                    if task not in state.cancelled:  # the breaker's cancel is taken back here
                        raise
                    state.cancelled.discard(task)
                    if task.uncancel() > 0:
                        raise  # a stop of the run as well
                    return None
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
        assert self.session is not None, "Client is used inside `async with`"
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
