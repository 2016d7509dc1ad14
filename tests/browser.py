"""A real headless Chromium, driven over the DevTools protocol, to check an HTML report.

`open_page` loads a local file and reports what a person would hit: console errors and
uncaught exceptions, images that did not load, links to files that do not exist or to anchors
that are not on the page, and any request that left the local files (a report must open
offline). Chromium comes from the system packages (`.ci/run` installs it when missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)
    images: int = 0
    links: int = 0
    screenshot: bytes = b""

    @property
    def clean(self) -> bool:
        return not (self.console_errors or self.broken_images or self.broken_links or self.remote_requests)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


COLLECT = """JSON.stringify({
  images: Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0]),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => [a.getAttribute('href'), a.href]),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id)
})"""


async def _drive(ws_url: str, page: Path, timeout: float) -> PageCheck:
    check = PageCheck()
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = 0
        pending: dict[int, asyncio.Future] = {}
        loaded = asyncio.Event()

        async def reader() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                    continue
                method, params = data.get("method"), data.get("params", {})
                if method == "Page.loadEventFired":
                    loaded.set()
                elif method == "Runtime.exceptionThrown":
                    details = params.get("exceptionDetails", {})
                    text = details.get("exception", {}).get("description") or details.get("text", "")
                    check.console_errors.append(f"uncaught: {text}"[:300])
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    check.console_errors.append(str(params.get("args"))[:300])
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    check.console_errors.append(params["entry"].get("text", "")[:300])
                elif method == "Network.requestWillBeSent":
                    url = params.get("request", {}).get("url", "")
                    if not url.startswith(("file:", "data:", "about:")):
                        check.remote_requests.append(url)

        async def call(method: str, **params: object) -> dict:
            nonlocal counter
            counter += 1
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            pending[counter] = future
            await ws.send_json({"id": counter, "method": method, "params": params})
            return await asyncio.wait_for(future, timeout)

        task = asyncio.create_task(reader())
        for domain in ("Page", "Runtime", "Log", "Network"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=page.resolve().as_uri())
        await asyncio.wait_for(loaded.wait(), timeout)
        await asyncio.sleep(0.5)  # late console messages
        found = json.loads((await call("Runtime.evaluate", expression=COLLECT))["result"]["result"]["value"])
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        task.cancel()
    import base64

    check.screenshot = base64.b64decode(shot["result"]["data"])
    check.images = len(found["images"])
    check.broken_images = [src for src, ok in found["images"] if not ok]
    check.links = len(found["links"])
    ids = set(found["ids"])
    for raw, absolute in found["links"]:
        parts = urlsplit(absolute)
        if raw.startswith("#"):
            if raw[1:] not in ids:
                check.broken_links.append(raw)
        elif parts.scheme == "file":
            if not Path(unquote(parts.path)).exists():
                check.broken_links.append(raw)
        else:
            check.broken_links.append(f"{raw} (not a local file)")
    return check


def open_page(page: Path, timeout: float = 60.0) -> PageCheck:
    """Load ``page`` in headless Chromium and check it (see the module docstring)."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    # Chromium's helper processes may still write to the profile as it exits: clean up leniently.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "--window-size=1200,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so every helper process ends with it
        )
        try:
            assert proc.stderr is not None
            port = None
            for line in proc.stderr:
                match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
                if match:
                    port = int(match.group(1))
                    break
            if port is None:
                raise RuntimeError("chromium did not start its DevTools server")
            return asyncio.run(_run(port, page, timeout))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


async def _run(port: int, page: Path, timeout: float) -> PageCheck:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/json/list") as resp:
        targets = await resp.json()
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
    return await _drive(ws_url, page, timeout)
