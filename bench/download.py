"""Download benchmark: photoprep's fetch_all against the seed's sequential urlretrieve loop.

Serves N generated photo-like JPEGs (20-150 KB) from a real server on 127.0.0.1, in its own
process so that only the client's CPU is counted, and fetches them in two settings:

1. latency: every response is held 50 ms (nginx's echo_sleep), as a distant CDN would;
2. loopback: no added latency, so the client's CPU is the limit.

Each figure is the median of --repeat runs. The sequential loop is slow under latency, so it
runs on a subset there (--sequential-n, default 200) and its figures are per-image rates.

    python bench/download.py                 # N=5000, a table on stdout
    python bench/download.py --n 2000 --json # one JSON object of the figures only

Server: Debian's nginx with libnginx-mod-http-echo when present (installed with apt-get when
missing, running as root, unless --no-install); else a lean asyncio server in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from photoprep.core.params import DownloadParams
from photoprep.ingest.fetch import Place, fetch_all

LATENCY_S = 0.05
MIN_BYTES, MAX_BYTES = 20_000, 150_000
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- photos --------------------------------------------------------------------------------


def _base_jpegs(rng: random.Random) -> list[bytes]:
    """A few noisy gradient photos, encoded at sizes and qualities that span 20-150 KB."""
    import numpy as np
    from PIL import Image

    np_rng = np.random.default_rng(rng.randrange(2**32))
    bases: list[bytes] = []
    for width, height in [(480, 360), (640, 480), (800, 600), (960, 720), (1024, 768), (1280, 960)]:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        gradient = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 220], axis=-1)
        noise = np_rng.normal(0, 18, size=(height, width, 3)).astype(np.float32)
        pixels = np.clip(gradient + noise + 20, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        for quality in (40, 60, 75, 85, 92):
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            if MIN_BYTES <= out.tell() <= MAX_BYTES - 5_000:
                bases.append(out.getvalue())
    return bases


def _varied(base: bytes, rng: random.Random) -> bytes:
    """`base` made unique by a random JPEG comment segment right after SOI (still a valid JPEG)."""
    comment = rng.randbytes(rng.randrange(64, 4_000))
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


def make_photos(root: Path, n: int, seed: int = 0) -> tuple[list[str], int]:
    """Write n distinct JPEGs to root/photo/<id>; their ids and total bytes."""
    rng = random.Random(seed)
    bases = _base_jpegs(rng)
    folder = root / "photo"
    folder.mkdir(parents=True)
    ids = [f"p{i:06d}" for i in range(n)]
    total = 0
    for id_ in ids:
        data = _varied(rng.choice(bases), rng)
        (folder / id_).write_bytes(data)
        total += len(data)
    return ids, total


# -- servers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port}")


@dataclass
class Server:
    """A running photo server: URL templates of both settings and how to stop it."""

    name: str
    latency_template: str
    loopback_template: str
    stop: Callable[[], None]


def _ensure_nginx(install: bool) -> bool:
    """True when nginx and its echo module are here (installing them with apt-get if allowed)."""
    if shutil.which("nginx") and ECHO_MODULE.exists():
        return True
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    log("installing nginx and libnginx-mod-http-echo with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx", "libnginx-mod-http-echo"]):
        done = subprocess.run(command, env=env, capture_output=True, timeout=300)
        if done.returncode != 0:
            return False
    return bool(shutil.which("nginx")) and ECHO_MODULE.exists()


_NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
load_module {module};
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type image/jpeg;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{loopback_port};
        root {root};
        location /photo/ {{ }}
    }}
    server {{
        listen 127.0.0.1:{latency_port};
        root {root};
        # Hold every response LATENCY_S, then serve the file as the plain server does.
        location /photo/ {{ echo_sleep {latency}; echo_exec @file; }}
        location @file {{ }}
    }}
}}
"""


def start_nginx(root: Path, tmp: Path) -> Server:
    """nginx on two ports of 127.0.0.1: one plain, one holding each response LATENCY_S."""
    loopback_port, latency_port = _free_port(), _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",  # workers must read the mkdtemp (0700) tree
            tmp=tmp,
            module=ECHO_MODULE,
            root=root,
            loopback_port=loopback_port,
            latency_port=latency_port,
            latency=LATENCY_S,
        )
    )
    process = subprocess.Popen(
        ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def stop() -> None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()

    try:
        _wait_listening(loopback_port)
        _wait_listening(latency_port)
    except RuntimeError:
        stop()
        raise
    return Server(
        "nginx " + _nginx_version() + " + echo_sleep",
        f"http://127.0.0.1:{latency_port}/photo/{{id}}",
        f"http://127.0.0.1:{loopback_port}/photo/{{id}}",
        stop,
    )


def _nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return out.rsplit("/", 1)[-1] if "/" in out else "?"


class _PhotoProtocol(asyncio.Protocol):
    """HTTP/1.1 GET /photo/<id> from memory, each answer held `delay` seconds, in request order.

    A CDN's answer costs it next to nothing beside the 50 ms it is held; so should this one's, on
    the same cores as the client it measures. aiohttp.web (the server here before) spent its
    routing, request objects and handler task on every photo, and under 64 requests in flight
    held answers for 52 to 53 ms on average instead of 50: over 20,000 photos that alone was 0.3
    to 0.6 s of the wall charged to the client. This one parses the request line, holds the
    prepared answer with one timer and writes it whole.
    """

    def __init__(self, photos: dict[str, bytes], delay: float):
        self.photos = photos
        self.delay = delay
        self.buffer = b""
        self.replies: collections.deque[tuple[list[bytes], bool]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            line, _, headers = head.partition(b"\r\n")
            method, _, rest = line.partition(b" ")
            target, _, version = rest.partition(b" ")
            path = target.split(b"?", 1)[0].decode("latin-1")
            photo = self.photos.get(path.removeprefix("/photo/")) if path.startswith("/photo/") else None
            lowered = headers.lower()
            close = b"connection: close" in lowered or (
                version != b"HTTP/1.1" and b"connection: keep-alive" not in lowered
            )
            found = method == b"GET" and photo is not None
            body = photo if photo is not None and found else b"not found"
            status = b"200 OK" if found else b"404 Not Found"
            kind = b"image/jpeg" if found else b"text/plain"
            head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
                status,
                kind,
                len(body),
                b"Connection: close\r\n" if close else b"",
            )
            reply = [head, body]
            self.replies.append((reply, close))
            asyncio.get_running_loop().call_later(self.delay, self._answer)

    def _answer(self) -> None:
        # Every answer is held the same time: the oldest request is due first.
        reply, close = self.replies.popleft()
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.writelines(reply)
        if close:
            self.transport.close()


def _serve_python(root: str, loopback_port: int, latency_port: int) -> None:
    """Child process: the photos in memory, served by `_PhotoProtocol` on both ports."""
    photos = {p.name: p.read_bytes() for p in (Path(root) / "photo").iterdir()}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for delay, port in ((0.0, loopback_port), (LATENCY_S, latency_port)):
            await loop.create_server(
                lambda delay=delay: _PhotoProtocol(photos, delay), "127.0.0.1", port, backlog=1024
            )
        await asyncio.Event().wait()

    asyncio.run(main())


def start_python_server(root: Path) -> Server:
    """The fallback: an asyncio server in a child process (`_PhotoProtocol`), timers for the latency."""
    loopback_port, latency_port = _free_port(), _free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_python, args=(str(root), loopback_port, latency_port), daemon=True
    )
    process.start()

    def stop() -> None:
        process.terminate()
        process.join(10)

    _wait_listening(loopback_port, timeout=60)
    _wait_listening(latency_port, timeout=60)
    return Server(
        "python asyncio (fallback) + call_later",
        f"http://127.0.0.1:{latency_port}/photo/{{id}}",
        f"http://127.0.0.1:{loopback_port}/photo/{{id}}",
        stop,
    )


def check_server(server: Server, root: Path, some_id: str) -> None:
    """Both settings serve the exact bytes, and the latency one holds responses >= LATENCY_S."""
    expected = (root / "photo" / some_id).read_bytes()
    for template, slow in ((server.loopback_template, False), (server.latency_template, True)):
        started = time.perf_counter()
        with urllib.request.urlopen(template.format(id=some_id)) as response:
            body = response.read()
        took = time.perf_counter() - started
        if body != expected:
            raise RuntimeError(f"{server.name}: wrong bytes from {template}")
        if slow and took < LATENCY_S * 0.9:
            raise RuntimeError(f"{server.name}: no latency on {template} ({took * 1000:.1f} ms)")


# -- fetchers ------------------------------------------------------------------------------


@dataclass
class Figures:
    """One measurement: images, wall seconds, client CPU seconds, bytes."""

    images: int
    seconds: float
    cpu_seconds: float
    bytes: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def cpu_ms_per_image(self) -> float:
        return self.cpu_seconds * 1000 / self.images


def _measure(work: Callable[[], int], images: int) -> Figures:
    """Run `work` (which returns bytes fetched); wall and this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    fetched = work()
    return Figures(images, time.perf_counter() - wall, time.process_time() - cpu, fetched)


def run_fetch_all(ids: list[str], template: str, scratch: Path, p: DownloadParams) -> Figures:
    """photoprep's fetch_all of every id into a fresh store."""
    records = pd.DataFrame({"source": "bench", "id": ids, "url": [template.format(id=i) for i in ids]})
    store = Path(tempfile.mkdtemp(dir=scratch))

    def work() -> int:
        table = fetch_all(records, Place(store, scratch), p, progress=False)
        failed = table[table["status"] != "ok"]
        if len(failed):
            raise RuntimeError(
                f"fetch_all: {len(failed)} failed: {failed['reason'].value_counts().to_dict()}"
            )
        return int(table["size"].sum())

    figures = _measure(work, len(ids))
    shutil.rmtree(store)
    return figures


def run_sequential(ids: list[str], template: str, scratch: Path) -> Figures:
    """The seed's loop: urlretrieve one id after another, a linear `if id in list` check."""
    out = Path(tempfile.mkdtemp(dir=scratch))

    def work() -> int:
        downloaded: list[str] = []
        total = 0
        for id_ in ids:
            if id_ in downloaded:
                continue
            path, _ = urllib.request.urlretrieve(template.format(id=id_), out / id_)
            downloaded.append(id_)
            total += os.path.getsize(path)
        return total

    figures = _measure(work, len(ids))
    shutil.rmtree(out)
    return figures


def median_figures(runs: list[Figures]) -> dict[str, float]:
    """Median of each rate over repeated runs."""
    return {
        "images": runs[0].images,
        "images_per_s": statistics.median(f.images_per_s for f in runs),
        "mb_per_s": statistics.median(f.mb_per_s for f in runs),
        "cpu_ms_per_image": statistics.median(f.cpu_ms_per_image for f in runs),
        "runs": len(runs),
    }


def bench_setting(
    name: str, template: str, ids: list[str], sequential_n: int, repeat: int, scratch: Path, p: DownloadParams
) -> dict:
    """fetch_all on every id and the sequential loop on the first `sequential_n`, `repeat` times each."""
    log(f"{name}: fetch_all x{repeat} on {len(ids)} images, sequential x{repeat} on {sequential_n} ...")
    run_fetch_all(ids[: min(len(ids), 200)], template, scratch, p)  # warm-up: imports, page cache
    parallel: list[Figures] = []
    sequential: list[Figures] = []
    for _ in range(repeat):  # interleaved, so that both fetchers meet the same load on the machine
        parallel.append(run_fetch_all(ids, template, scratch, p))
        sequential.append(run_sequential(ids[:sequential_n], template, scratch))
    fetch_all_figures = median_figures(parallel)
    sequential_figures = median_figures(sequential)
    return {
        "fetch_all": fetch_all_figures,
        "sequential": sequential_figures,
        "speedup": fetch_all_figures["images_per_s"] / sequential_figures["images_per_s"],
    }


# -- report ----------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    print(
        f"server: {result['server']}; {result['n']} JPEGs, {result['mean_kb']:.0f} KB mean "
        f"({MIN_BYTES // 1000}-{MAX_BYTES // 1000} KB); medians of {result['repeat']} runs"
    )
    print(
        f"fetch_all: concurrency {result['concurrency']}, per_host {result['per_host']} "
        f"(at most {result['per_host']} connections to the one host)"
    )
    print(f"{'setting':<10} {'fetcher':<11} {'images':>7} {'img/s':>9} {'MB/s':>8} {'client CPU ms/img':>18}")
    for setting in ("latency", "loopback"):
        figures = result[setting]
        for fetcher in ("fetch_all", "sequential"):
            f = figures[fetcher]
            print(
                f"{setting:<10} {fetcher:<11} {f['images']:>7} {f['images_per_s']:>9.1f} "
                f"{f['mb_per_s']:>8.1f} {f['cpu_ms_per_image']:>18.3f}"
            )
        print(f"{setting:<10} {'speedup':<11} {'':>7} {figures['speedup']:>8.1f}x")
    load = result["load_avg_1m"]
    print(
        f"load average (1 min): {load['before']:.2f} before, {load['after']:.2f} after, "
        f"on {os.cpu_count()} cores (other work takes cores from client and server alike)"
    )
    print(
        f"latency setting: {LATENCY_S * 1000:.0f} ms per response; the sequential loop ran on "
        f"{result['latency']['sequential']['images']} images, rates are per image."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="photos served (default 5000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are printed")
    parser.add_argument(
        "--sequential-n",
        type=int,
        default=200,
        help="images for the sequential loop under latency (default 200)",
    )
    parser.add_argument(
        "--sequential-loopback-n",
        type=int,
        default=2000,
        help="images for the sequential loop on loopback (default 2000)",
    )
    parser.add_argument("--server", choices=["auto", "nginx", "python"], default="auto")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install nginx")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures only")
    args = parser.parse_args()

    p = DownloadParams()
    with tempfile.TemporaryDirectory(prefix="photoprep-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root, scratch = tmp / "www", tmp / "scratch"
        scratch.mkdir()
        log(f"generating {args.n} JPEGs ...")
        ids, total = make_photos(root, args.n)
        use_nginx = args.server == "nginx" or (args.server == "auto" and _ensure_nginx(not args.no_install))
        if args.server == "nginx" and not _ensure_nginx(not args.no_install):
            raise SystemExit("nginx with the echo module is not available")
        server = start_nginx(root, tmp) if use_nginx else start_python_server(root)
        try:
            check_server(server, root, ids[0])
            log(f"server: {server.name}")
            load_before = os.getloadavg()[0]
            result = {
                "server": server.name,
                "n": args.n,
                "mean_kb": total / args.n / 1000,
                "repeat": args.repeat,
                "concurrency": p.concurrency,
                "per_host": p.per_host,
                "latency_ms": LATENCY_S * 1000,
                "latency": bench_setting(
                    "latency",
                    server.latency_template,
                    ids,
                    min(args.sequential_n, args.n),
                    args.repeat,
                    scratch,
                    p,
                ),
                "loopback": bench_setting(
                    "loopback",
                    server.loopback_template,
                    ids,
                    min(args.sequential_loopback_n, args.n),
                    args.repeat,
                    scratch,
                    p,
                ),
            }
            # Other work on the machine takes cores from client and server alike: say how busy it was.
            result["load_avg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
        finally:
            server.stop()
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
