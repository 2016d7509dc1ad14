"""Shared fixtures.

- `cdn`, `other_cdn`: real HTTP servers on 127.0.0.1 (each its own port, hence its own host)
  serving payloads by id at ``/photo/<url-quoted id>``, with faults injected on demand and a
  log of the requests each id received.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import quote, unquote

import pytest

# -- loopback CDN ------------------------------------------------------------------------


@dataclass
class _Payload:
    data: bytes
    content_type: str
    chunked: bool
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class _Fault:
    """What the next `times` requests for an id get instead of the payload (None: all of them)."""

    kind: str  # status | slow | truncate | redirect | drip
    times: int | None
    status: int = 0
    seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    location: str = ""


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops SYNs when a fetcher opens many connections at once


class _Loopback:
    """A threaded HTTP server on 127.0.0.1 for one test: serving from `__enter__` to `__exit__`."""

    def _listen(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True  # a handler asleep in a `slow` fault must not block teardown
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def port(self) -> int:
        return self._server.server_address[1]


class LoopbackCDN(_Loopback):
    """A threaded HTTP/1.1 server on 127.0.0.1 that serves `add`-ed payloads at /photo/<id>.

    Faults apply in the order they were added, each to its next `times` requests for the id.
    Unknown ids get 404. Every request is logged (arrival time, id) before it is answered.
    """

    def __init__(self) -> None:
        self._payloads: dict[str, _Payload] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._log: list[tuple[float, str, dict[str, str]]] = []  # (arrival, id, request headers)
        self._lock = threading.Lock()
        self._listen(_handler_for(self))
        self._server.handle_error = lambda request, address: None  # clients hang up on purpose here

    @property
    def url_template(self) -> str:
        """``http://127.0.0.1:PORT/photo/{id}``; fill `{id}` URL-quoted, as `url()` does."""
        return f"http://127.0.0.1:{self.port}/photo/{{id}}"

    def url(self, id_: str) -> str:
        """The URL of an id: the template with the id quoted (slashes too)."""
        return self.url_template.format(id=quote(id_, safe=""))

    # faults and payloads

    def add(
        self,
        id_: str,
        data: bytes,
        content_type: str = "image/jpeg",
        chunked: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Serve `data` for `id_` (with Content-Length, or chunked without it), with extra `headers`
        (e.g. ``Content-Encoding: gzip`` for bytes that are gzipped already)."""
        self._payloads[id_] = _Payload(data, content_type, chunked, tuple((headers or {}).items()))

    def fail(
        self, id_: str, status: int = 500, times: int | None = 1, headers: dict[str, str] | None = None
    ) -> None:
        """Answer `status` (with `headers`) to the next `times` requests."""
        self._add_fault(id_, _Fault("status", times, status=status, headers=tuple((headers or {}).items())))

    def retry_after(self, id_: str, seconds: float | str, times: int | None = 1, status: int = 429) -> None:
        """Answer `status` with ``Retry-After: seconds`` (a number or an HTTP date)."""
        self.fail(id_, status=status, times=times, headers={"Retry-After": str(seconds)})

    def slow(self, id_: str, seconds: float, times: int | None = 1) -> None:
        """Wait `seconds` before answering the next `times` requests."""
        self._add_fault(id_, _Fault("slow", times, seconds=seconds))

    def drip(self, id_: str, seconds: float, times: int | None = 1) -> None:
        """Announce the full Content-Length, then send the body one byte every `seconds`."""
        self._add_fault(id_, _Fault("drip", times, seconds=seconds))

    def truncate(self, id_: str, times: int | None = 1) -> None:
        """Announce the full Content-Length, send half the body, hang up."""
        self._add_fault(id_, _Fault("truncate", times))

    def redirect(self, id_: str, to_url: str, times: int | None = None, status: int = 302) -> None:
        """Redirect requests for `id_` to `to_url` (absolute or relative)."""
        self._add_fault(id_, _Fault("redirect", times, status=status, location=to_url))

    # the request log

    def requests_for(self, id_: str) -> int:
        """How many requests `id_` has received."""
        with self._lock:
            return sum(1 for _, logged, _ in self._log if logged == id_)

    def request_log(self) -> list[tuple[float, str]]:
        """(time.monotonic() at arrival, id) of every request, in arrival order."""
        with self._lock:
            return [(arrival, logged) for arrival, logged, _ in self._log]

    def headers_for(self, id_: str) -> list[dict[str, str]]:
        """The request headers of each request for `id_`."""
        with self._lock:
            return [headers for _, logged, headers in self._log if logged == id_]

    def heal(self) -> None:
        """Drop every fault: from now on each id gets its payload (or 404)."""
        with self._lock:
            self._faults.clear()

    @property
    def total_requests(self) -> int:
        with self._lock:
            return len(self._log)

    # internals

    def _add_fault(self, id_: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(id_, []).append(fault)

    def _next_fault(self, id_: str, headers: dict[str, str]) -> _Fault | None:
        """Log the request; the fault it gets, if any (and count it down)."""
        with self._lock:
            self._log.append((time.monotonic(), id_, headers))
            for fault in self._faults.get(id_, []):
                if fault.times is None:
                    return fault
                if fault.times > 0:
                    fault.times -= 1
                    return fault
        return None


def _handler_for(cdn: LoopbackCDN) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            id_ = unquote(path.removeprefix("/photo/")) if path.startswith("/photo/") else ""
            fault = cdn._next_fault(id_, dict(self.headers.items()))
            try:
                self._answer(id_, fault)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (a timeout test): fine

        def _answer(self, id_: str, fault: _Fault | None) -> None:
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "status":
                self._send(fault.status, b"<html><body>error</body></html>", "text/html", fault.headers)
                return
            if fault is not None and fault.kind == "redirect":
                self._send(fault.status, b"", "text/plain", (("Location", fault.location),))
                return
            payload = cdn._payloads.get(id_)
            if payload is None:
                self._send(404, b"<html><body>not found</body></html>", "text/html")
            elif fault is not None and fault.kind == "truncate":
                self._send(200, payload.data, payload.content_type, cut=len(payload.data) // 2)
            elif fault is not None and fault.kind == "drip":
                self._drip(payload, fault.seconds)
            elif payload.chunked:
                self._send_chunked(payload)
            else:
                self._send(200, payload.data, payload.content_type, payload.headers)

        def _send(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: tuple[tuple[str, str], ...] = (),
            cut: int | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if cut is None:
                self.wfile.write(body)
            else:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True

        def _drip(self, payload: _Payload, seconds: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", payload.content_type)
            self.send_header("Content-Length", str(len(payload.data)))
            self.end_headers()
            for i in range(len(payload.data)):
                self.wfile.write(payload.data[i : i + 1])
                self.wfile.flush()
                time.sleep(seconds)

        def _send_chunked(self, payload: _Payload) -> None:
            self.send_response(200)
            self.send_header("Content-Type", payload.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            step = 16 * 1024
            for start in range(0, len(payload.data), step):
                part = payload.data[start : start + step]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@pytest.fixture
def cdn() -> Iterator[LoopbackCDN]:
    """A loopback CDN; see LoopbackCDN."""
    with LoopbackCDN() as server:
        yield server


@pytest.fixture
def other_cdn() -> Iterator[LoopbackCDN]:
    """A second loopback CDN on another port: another host for redirect tests."""
    with LoopbackCDN() as server:
        yield server


@dataclass
class WebDAVServer:
    """A real WebDAV server (wsgidav) on 127.0.0.1, serving a folder: a DVC remote for tests."""

    url: str
    root: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[WebDAVServer]:
    root = tmp_path / "webdav"
    (root / "dvc").mkdir(parents=True)  # WebDAV creates a collection only inside an existing one
    port = _free_port()
    wsgidav = Path(sys.executable).parent / "wsgidav"
    log = open(tmp_path / "webdav.log", "wb")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(
        [
            str(wsgidav),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--root",
            str(root),
            "--auth",
            "anonymous",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "webdav.log").read_text()) from None
                time.sleep(0.1)
        yield WebDAVServer(url=f"webdav://127.0.0.1:{port}/dvc", root=root / "dvc")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


# -- loopback model hub ------------------------------------------------------------------


class LoopbackHub(_Loopback):
    """A Hugging Face hub stand-in on 127.0.0.1: ``/<org>/<repo>/resolve/<revision>/<file>``, HEAD
    and GET, with the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length) and the
    hub's error codes (404 with X-Error-Code EntryNotFound or RepoNotFound). Point
    ``HF_ENDPOINT`` at :attr:`url`. Every request is logged."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._listen(_hub_handler_for(self))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[(repo, filename)] = data

    def downloads(self) -> int:
        """GET requests for files (not HEAD, not the hub's other endpoints)."""
        with self._lock:
            return sum(1 for method, path in self.log if method == "GET" and "/resolve/" in path)


def _hub_handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    import hashlib

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            with hub._lock:
                hub.log.append((self.command, self.path))
            parts = unquote(self.path.split("?", 1)[0]).strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self._status(404, "")
                return
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            data = hub.files.get((repo, filename))
            if data is None:
                known = any(r == repo for r, _ in hub.files)
                self._status(404, "EntryNotFound" if known else "RepoNotFound")
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", hub.COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _status(self, status: int, code: str) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    """A loopback model hub; see LoopbackHub."""
    with LoopbackHub() as server:
        yield server
