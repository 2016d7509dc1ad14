"""What a download promises under faults, each with a real socket on 127.0.0.1 (see docs/faults-download.md).

- a dead host (refused, silent, unresolvable, 404 to everything) stops the stage within 30 s with
  one line and a non-zero exit, its rows failed and resumable; a flaky host is fetched in full;
- kill -9 or Ctrl-C of a real `python stages/download.py` halfway: the re-run requests at most 10%
  of what was asked before, and its table and shards equal an uninterrupted run's byte for byte;
- limits hold on decoded bytes and on wall-clock time; local files stay inside the source;
- damaged shards are set aside and fetched again; hostile folder entries become refused rows.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import brotli
import pandas as pd
import pytest
import yaml
from downloads import FAST, assert_failed, assert_ok, photo, records

from photoprep.core.params import DownloadParams
from photoprep.ingest import journal, manifest, reports
from photoprep.ingest.client import parse_retry_after
from photoprep.ingest.fetch import Place, download
from photoprep.ingest.sources import SourceConfig
from photoprep.review import funnel

REPO = Path(__file__).resolve().parents[1]
DEAD_IDS = 5000


# -- a project for real stage runs ---------------------------------------------------------


def make_project(root: Path, ids: list[str], url: str, download: dict | None = None, name: str = "x") -> Path:
    """A folder with params.yaml and one heobs source listing `ids` at `url` (a template with {id})."""
    source = root / "pipeline" / "sources" / name
    source.mkdir(parents=True)
    (source / "source.yaml").write_text(f'format: heobs\nmanifest: photos.txt\nurl: "{url}"\n')
    (source / "photos.txt").write_text("".join(f"{i} | title {i} | eng\n" for i in ids))
    params = {"sources": [name], "download": download or {}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage_env(quiet: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    if quiet:
        env["PHOTOPREP_QUIET"] = "1"
    return env


def _ctrl_c_as_on_a_terminal() -> None:
    # A test runner started in the background of a non-interactive shell (`make test &`, CI)
    # ignores SIGINT, and a child inherits that: Python then never raises KeyboardInterrupt.
    # The stage under test is a foreground command, whose Ctrl-C is SIGINT's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stage(root: Path, script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "stages" / f"{script}.py"), *args],
        cwd=root,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_on_a_terminal,
    )


def run_stage(root: Path, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{script}.py"), *args],
        cwd=root,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) and never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1024)
        yield s.getsockname()[1]


# -- the circuit breaker -------------------------------------------------------------------


def dead_host_stops(tmp_path: Path, url: str, reason: str) -> str:
    """Run the download stage on DEAD_IDS ids at `url` with default params; the one line it ends with."""
    ids = [f"id{i:05d}" for i in range(DEAD_IDS)]
    root = make_project(tmp_path, ids, url)
    started = time.monotonic()
    done = run_stage(root, "download", "x", timeout=90)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"a dead host took {elapsed:.1f} s"
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("photoprep: download@x: host ") and " is down: " in line, line
    assert f"ids left as {reason}" in line and "is the url template right?" in line
    table = pd.read_parquet(root / "data" / "raw" / "x.parquet")
    assert len(table) == DEAD_IDS and (table["status"] == "failed").all()
    assert (table["reason"] == reason).sum() >= DEAD_IDS - 200  # the rest failed on their own first
    failed = pd.read_csv(root / "reports" / "download" / "x" / "failed.csv")
    assert len(failed) == DEAD_IDS
    return line


def test_refused_port_stops_the_download_within_30_s(tmp_path):
    line = dead_host_stops(tmp_path, f"http://127.0.0.1:{free_port()}/photo/{{id}}", "host_unreachable")
    assert "is the network up?" in line and "Connect call failed" in line


def test_server_that_never_answers_stops_the_download_within_30_s(tmp_path, silent_server):
    line = dead_host_stops(tmp_path, f"http://127.0.0.1:{silent_server}/photo/{{id}}", "host_unreachable")
    assert "timeout" in line


def test_unresolvable_name_stops_the_download_within_30_s(tmp_path):
    line = dead_host_stops(tmp_path, "http://cdn.photoprep-test.invalid/photo/{id}", "host_unreachable")
    assert "cdn.photoprep-test.invalid" in line


def test_host_that_answers_404_to_everything_stops_the_download_within_30_s(tmp_path, cdn):
    line = dead_host_stops(tmp_path, cdn.url_template, "host_all_404")
    assert "HTTP 404" in line
    assert cdn.total_requests < 1000


def test_a_rerun_after_the_host_comes_back_fetches_every_id(tmp_path, cdn):
    ids = [f"id{i:04d}" for i in range(400)]
    root = make_project(
        tmp_path, ids, cdn.url_template, {"host_down_after": 16, "concurrency": 8, "per_host": 8}
    )
    assert run_stage(root, "download", "x").returncode == 1
    for i in ids:
        cdn.add(i, photo(i))
    done = run_stage(root, "download", "x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("download@x: 400 ids: 400 ok")
    assert (pd.read_parquet(root / "data" / "raw" / "x.parquet")["status"] == "ok").all()


def test_host_answering_503_to_one_request_in_ten_is_fetched_in_full(tmp_path, cdn):
    ids = [f"id{i:04d}" for i in range(1000)]
    for n, i in enumerate(ids):
        cdn.add(i, photo(i, 500))
        if n % 10 == 0:
            cdn.fail(i, status=503, times=1)
    p = DownloadParams(backoff_base=0.02, backoff_max=0.2)
    result = download(records(cdn.url, *ids), Place(tmp_path / "store", tmp_path), p, progress=False)
    assert result.hosts_down == []
    assert (result.table["status"] == "ok").all()
    assert cdn.total_requests == 1100


def test_host_that_answered_before_it_fails_is_not_cut_off(tmp_path, cdn):
    ids = [f"id{i:04d}" for i in range(300)]
    for i in ids[:20]:
        cdn.add(i, photo(i))
    p = FAST.model_copy(update={"host_down_after": 16, "retries": 0})
    result = download(records(cdn.url, *ids), Place(tmp_path / "store", tmp_path), p, progress=False)
    assert result.hosts_down == []
    assert (result.table["reason"] == "http_404").sum() == 280
    assert cdn.total_requests == 300


# -- interrupted downloads resume ------------------------------------------------------------

RESUME_IDS = [f"p{i:05d}" for i in range(2000)]
# concurrency 16: the test counts every id asked before the kill, in flight or not, against 10%.
RESUME_PARAMS = {"concurrency": 16, "per_host": 16, "shard_mb": 1}


@pytest.fixture
def slow_cdn(cdn):
    """2,000 photos, each answered after 50 ms."""
    for i in RESUME_IDS:
        cdn.add(i, photo(i, 2000))
        cdn.slow(i, 0.05, times=None)
    return cdn


def outputs(root: Path) -> dict[str, bytes]:
    """The download's outputs: table, shards, reports (the bytes of each file)."""
    store = root / "data" / "raw" / "x"
    files = [root / "data" / "raw" / "x.parquet", *sorted(p for p in store.rglob("*") if p.is_file())]
    files += sorted((root / "reports" / "download" / "x").iterdir())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def asked(cdn, since: int) -> list[str]:
    return [i for _, i in cdn.request_log()[since:]]


def interrupted_then_resumed(tmp_path: Path, cdn, sig: int) -> tuple[Path, set[str], set[str], str]:
    root = make_project(tmp_path / "interrupted", RESUME_IDS, cdn.url_template, RESUME_PARAMS)
    proc = start_stage(root, "download", "x")
    deadline = time.monotonic() + 60
    while cdn.total_requests < len(RESUME_IDS) // 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    first = set(asked(cdn, 0))
    assert len(first) < len(RESUME_IDS), "the run ended before the kill"
    before = cdn.total_requests
    done = run_stage(root, "download", "x")
    assert done.returncode == 0, done.stderr
    second = set(asked(cdn, before))
    return root, first, second, stderr


def uninterrupted(tmp_path: Path, cdn) -> Path:
    root = make_project(tmp_path / "uninterrupted", RESUME_IDS, cdn.url_template, RESUME_PARAMS)
    done = run_stage(root, "download", "x")
    assert done.returncode == 0, done.stderr
    return root


def test_kill_9_halfway_then_rerun_requests_at_most_a_tenth_again_and_ends_byte_identical(tmp_path, slow_cdn):
    root, first, second, _ = interrupted_then_resumed(tmp_path, slow_cdn, signal.SIGKILL)
    again = first & second
    print(f"kill -9: {len(first)} ids asked before the kill, {len(again)} of them asked again")
    assert len(again) <= 0.1 * len(first), f"{len(again)} of {len(first)} asked again"
    assert first | second == set(RESUME_IDS)
    assert outputs(root) == outputs(uninterrupted(tmp_path, slow_cdn))
    assert not list((root / "data" / "raw" / "x").glob(".*")), "no journal or temporary shard left"


def test_ctrl_c_halfway_stops_with_one_line_and_the_rerun_ends_byte_identical(tmp_path, slow_cdn):
    root, first, second, stderr = interrupted_then_resumed(tmp_path, slow_cdn, signal.SIGINT)
    line = one_line(stderr)
    assert line.startswith("photoprep: download@x: interrupted by SIGINT: kept "), line
    kept = int(line.split("kept ")[1].split(" of ")[0].replace(",", ""))
    print(f"SIGINT: {len(first)} ids asked before, {kept} kept, {len(first & second)} asked again")
    assert kept >= len(first) - 0.1 * len(first)
    assert len(first & second) <= 0.1 * len(first)
    assert outputs(root) == outputs(uninterrupted(tmp_path, slow_cdn))


def test_sigterm_stops_as_cleanly_as_ctrl_c(tmp_path, slow_cdn):
    root = make_project(tmp_path, RESUME_IDS, slow_cdn.url_template, RESUME_PARAMS)
    proc = start_stage(root, "download", "x")
    while slow_cdn.total_requests < 300:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted by SIGTERM: kept " in one_line(stderr)


def test_a_torn_journal_line_is_ignored_and_the_rest_fetched_again(tmp_path, cdn):
    ids = [f"t{i:03d}" for i in range(50)]
    for i in ids:
        cdn.add(i, photo(i))
    store = tmp_path / "store"
    store.mkdir()
    j = journal.Journal(store)
    j.commit([("demo", ids[0], cdn.url(ids[0]), "failed", "http_500", 500, 1, "", 0, "")], None)
    j.close()
    with open(journal.journal_path(store), "ab") as f:
        f.write(b'["demo","t001","http://x"')  # a kill in the middle of a write
    assert list(journal.read_journal(store).rows) == [("demo", ids[0])]
    result = download(records(cdn.url, *ids), Place(store, tmp_path), FAST, progress=False)
    assert (result.table["status"] == "ok").all()
    assert not journal.journal_path(store).exists()


# -- damaged shards ------------------------------------------------------------------------


def test_a_truncated_shard_is_set_aside_and_its_ids_fetched_again(tmp_path, cdn):
    ids = ["a", "b", "c"]
    for i in ids:
        cdn.add(i, photo(i))
    store = tmp_path / "store"
    first = download(records(cdn.url, *ids), Place(store, tmp_path), FAST, progress=False).table
    (shard,) = store.glob("shard-*.tar")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 5000)
    result = download(records(cdn.url, *ids), Place(store, tmp_path), FAST, previous=first, progress=False)
    assert [cdn.requests_for(i) for i in ids] == [2, 2, 2]
    assert any("damaged" in note and shard.name in note for note in result.notes)
    assert (store / f".damaged-{shard.name}").exists()
    for i in ids:
        assert_ok(tmp_path, result.table, i, photo(i))
    assert result.table.equals(first)


def test_a_shard_whose_header_lies_is_set_aside(tmp_path, cdn):
    cdn.add("a", photo("a"))
    store = tmp_path / "store"
    first = download(records(cdn.url, "a"), Place(store, tmp_path), FAST, progress=False).table
    (shard,) = store.glob("shard-*.tar")
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x01  # the member's name no longer matches the header checksum
    shard.write_bytes(bytes(data))
    result = download(records(cdn.url, "a"), Place(store, tmp_path), FAST, previous=first, progress=False)
    assert cdn.requests_for("a") == 2 and result.notes


# -- limits on what is decoded and on time ---------------------------------------------------


def zeros_compressed(encoding: str, size: int) -> bytes:
    if encoding == "gzip":
        out = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        out = zlib.compressobj(9)
    else:
        return brotli.compress(b"\0" * size)
    block = b"\0" * (1 << 20)
    parts = [out.compress(block) for _ in range(size // len(block))]
    return b"".join([*parts, out.flush()])


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_that_expands_past_max_bytes_is_too_large(tmp_path, cdn, encoding):
    bomb = zeros_compressed(encoding, 64 << 20)
    assert len(bomb) < 200_000
    cdn.add("bomb", bomb, headers={"Content-Encoding": encoding})
    p = FAST.model_copy(update={"max_bytes": 1_000_000})
    table = download(records(cdn.url, "bomb"), Place(tmp_path / "store", tmp_path), p, progress=False).table
    assert_failed(table, "bomb", "too_large")
    assert cdn.requests_for("bomb") == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_stored_decoded(tmp_path, cdn, encoding):
    data = photo("a", 50_000)
    body = (
        gzip.compress(data)
        if encoding == "gzip"
        else zlib.compress(data)
        if encoding == "deflate"
        else brotli.compress(data)
    )
    cdn.add("a", body, headers={"Content-Encoding": encoding})
    table = download(records(cdn.url, "a"), Place(tmp_path / "store", tmp_path), FAST, progress=False).table
    assert_ok(tmp_path, table, "a", data)


def test_a_slow_drip_ends_at_the_request_deadline(tmp_path, cdn):
    cdn.add("drip", photo("drip", 200))
    cdn.drip("drip", 0.05, times=None)  # a byte every 50 ms: never silent for read_timeout
    p = FAST.model_copy(update={"request_deadline": 1.0})
    started = time.monotonic()
    table = download(records(cdn.url, "drip"), Place(tmp_path / "store", tmp_path), p, progress=False).table
    assert time.monotonic() - started < 5
    assert_failed(table, "drip", "deadline")
    assert cdn.requests_for("drip") == 1, "a deadline is not retried"


def test_a_negative_retry_after_is_no_header(tmp_path, cdn):
    assert parse_retry_after("-5") is None
    assert parse_retry_after("0") == 0.0
    cdn.add("a", photo("a"))
    cdn.retry_after("a", "-5", status=503)
    p = FAST.model_copy(update={"backoff_base": 0.2, "backoff_max": 0.5})
    table = download(records(cdn.url, "a"), Place(tmp_path / "store", tmp_path), p, progress=False).table
    assert_ok(tmp_path, table, "a", photo("a"))
    (first, second), _ = zip(*cdn.request_log(), strict=True)
    assert second - first >= 0.1, "the minimum backoff applies, not 'no wait at all'"


# -- local files stay inside the source --------------------------------------------------------


def test_file_urls_and_symlinks_that_leave_the_source_are_refused(tmp_path):
    source = tmp_path / "source"
    (source / "cdn").mkdir(parents=True)
    (source / "cdn" / "ok.jpg").write_bytes(photo("ok"))
    (tmp_path / "secret").write_bytes(b"top secret")
    (source / "cdn" / "link.jpg").symlink_to(tmp_path / "secret")
    (source / "cdn" / "inner.jpg").symlink_to(source / "cdn" / "ok.jpg")
    (source / "cdn" / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    urls = {
        "etc": "file:///etc/passwd",
        "proc": "file:///proc/self/environ",
        "secret": (tmp_path / "secret").as_uri(),
        "file-link": (source / "cdn" / "link.jpg").as_uri(),
        "path-link": "cdn/link.jpg",
        "dir-link": "cdn/dirlink/secret",
        "inner": "cdn/inner.jpg",
        "ok": (source / "cdn" / "ok.jpg").as_uri(),
    }
    recs = records(urls.__getitem__, *urls)
    table = download(recs, Place(tmp_path / "store", source), FAST, progress=False).table
    for id_ in ("etc", "proc", "secret", "file-link", "path-link", "dir-link"):
        assert_failed(table, id_, "path_outside_source")
    assert_ok(tmp_path, table, "inner", photo("ok"))
    assert_ok(tmp_path, table, "ok", photo("ok"))


# -- hostile manifests and folders ---------------------------------------------------------------


def folder_source(tmp_path: Path) -> SourceConfig:
    return SourceConfig(name="f", directory=tmp_path / "f", format="folder", manifest="images")


def test_folder_source_lists_symlinked_folders_fifos_and_non_utf8_names_as_refused_rows(tmp_path):
    cfg = folder_source(tmp_path)
    images = cfg.manifest_path
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "a.jpg").write_bytes(photo("a"))
    (tmp_path / "outside").mkdir()
    (images / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (images / "inner").symlink_to(images / "cat", target_is_directory=True)
    os.mkfifo(images / "cat" / "pipe.jpg")
    bad_name = os.path.join(os.fsencode(images / "cat"), b"caf\xe9.jpg")
    with open(bad_name, "wb") as f:
        f.write(photo("b"))
    result: dict = {}
    reader = threading.Thread(target=lambda: result.setdefault("m", manifest.read_manifest(cfg)), daemon=True)
    reader.start()
    reader.join(10)
    assert "m" in result, "reading a folder with a FIFO in it must not block"
    m = result["m"]
    assert m.records["id"].tolist() == ["cat/a.jpg"]
    reasons = dict(zip(m.malformed["line"], m.malformed["reason"], strict=True))
    assert reasons["linked"] == "path_outside_source: symlinked folder"
    assert reasons["inner"] == "symlinked folder (not followed)"
    assert reasons["cat/pipe.jpg"].startswith("not a regular file")
    assert reasons["cat/caf\ufffd.jpg"] == "file name is not valid UTF-8"
    assert m.lines_read == len(m.records) + len(m.malformed)


def test_ids_dot_and_dot_dot_are_refused(tmp_path):
    source = tmp_path / "s"
    source.mkdir()
    (source / "photos.txt").write_text(". | a | eng\n.. | b | eng\nok | c | eng\n")
    cfg = SourceConfig(name="s", directory=source, format="heobs", manifest="photos.txt", url="http://h/{id}")
    m = manifest.read_manifest(cfg)
    assert m.records["id"].tolist() == ["ok"]
    assert m.malformed["reason"].tolist() == ["id is '.' or '..'"] * 2


def test_label_rows_matching_no_id_are_counted_in_the_funnel_and_listed(tmp_path):
    source = tmp_path / "s"
    source.mkdir()
    (source / "photos.txt").write_text("a | t | eng\nb | t | eng\n")
    cfg = SourceConfig(name="s", directory=source, format="heobs", manifest="photos.txt", url="http://h/{id}")
    listed = manifest.read_manifest(cfg)
    labels = pd.DataFrame({"source": ["s"] * 3, "id": ["a", "ghost", "zombie"], "label": ["x", "y", "z"]})
    table = listed.records.assign(status="failed", reason="http_404", http_status=404, attempts=1)
    reports.write_download_reports("s", listed, table, tmp_path / "reports", labels)
    counts = pd.read_json(tmp_path / "reports" / "counts.json", typ="series")
    assert counts["labels_unmatched"] == 2
    assert pd.read_csv(tmp_path / "reports" / "labels_unmatched.csv")["id"].tolist() == ["ghost", "zombie"]
    assert funnel.funnel({"s": dict(counts)}, {})["labels_unmatched"] == 2


def test_ctrl_c_of_a_partitioned_download_says_what_is_kept_and_the_rerun_ends_byte_identical(
    tmp_path, slow_cdn
):
    params = {**RESUME_PARAMS, "partitions": 3}
    root = make_project(tmp_path / "interrupted", RESUME_IDS, slow_cdn.url_template, params)
    proc = start_stage(root, "download", "x")
    deadline = time.monotonic() + 60
    while slow_cdn.total_requests < len(RESUME_IDS) // 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    line = one_line(stderr)
    assert line.startswith("photoprep: interrupted: each of the 3 partitions keeps the shards"), line
    first = set(asked(slow_cdn, 0))
    assert len(first) < len(RESUME_IDS), "the run ended before the interrupt"
    before = slow_cdn.total_requests
    done = run_stage(root, "download", "x")
    assert done.returncode == 0, done.stderr
    again = first & set(asked(slow_cdn, before))
    # Each partition resumes from its journal: what was committed is not asked again.
    assert len(again) <= 0.25 * len(first), f"{len(again)} of {len(first)} asked again"
    straight = make_project(tmp_path / "straight", RESUME_IDS, slow_cdn.url_template, params)
    assert run_stage(straight, "download", "x").returncode == 0
    assert outputs(root) == outputs(straight)
