"""Targets and path safety (`photoprep.ingest.targets`): what a url may name, and that no id leaves
its source."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from urllib.parse import quote

import pytest
from downloads import (
    FAST,
    assert_failed,
    assert_ok,
    files_under,
    make_source,
    photo,
    records,
    row,
    run,
)
from yarl import URL

from photoprep.ingest.store import SHARD_NAME
from photoprep.ingest.targets import read_local, reads_files, same_host


@pytest.mark.parametrize("url", ["ftp://example.org/x", "http://", "http://h:99999/x", "", "gopher://x/y"])
def test_urls_that_cannot_be_fetched_are_bad_url(tmp_path, url):
    table = run(records(lambda i: url, "x"), tmp_path)
    assert_failed(table, "x", "bad_url")


def test_an_upgrade_to_https_on_the_same_hostname_is_the_same_host():
    assert same_host(URL("http://cdn.example.org/photo/1"), URL("https://cdn.example.org/photo/1"))
    assert not same_host(URL("https://cdn.example.org/photo/1"), URL("http://cdn.example.org/photo/1"))
    assert not same_host(URL("http://cdn.example.org:8080/a"), URL("https://cdn.example.org/a"))
    assert not same_host(URL("http://cdn.example.org/a"), URL("http://img.example.org/a"))


def test_local_paths_relative_to_the_source_are_read(tmp_path):
    make_source(tmp_path, {"a b.jpg": photo("a"), "sub/c.jpg": photo("c")})
    recs = records(lambda i: f"cdn/{quote(i)}", "a b.jpg", "sub/c.jpg", "missing.jpg")
    table = run(recs, tmp_path)
    assert_ok(tmp_path, table, "a b.jpg", photo("a"))
    assert_ok(tmp_path, table, "sub/c.jpg", photo("c"))
    assert_failed(table, "missing.jpg", "not_found")
    assert row(table, "a b.jpg")["http_status"] == 0


def test_file_urls_are_read(tmp_path):
    base = make_source(tmp_path, {"a.jpg": photo("a")})
    recs = records(lambda i: (base / "cdn" / i).as_uri(), "a.jpg", "missing.jpg")
    table = run(recs, tmp_path)
    assert_ok(tmp_path, table, "a.jpg", photo("a"))
    assert_failed(table, "missing.jpg", "not_found")


def test_local_file_over_the_limit_is_too_large(tmp_path):
    make_source(tmp_path, {"big.jpg": photo("big", 20_000)})
    table = run(
        records(lambda i: f"cdn/{i}", "big.jpg"), tmp_path, FAST.model_copy(update={"max_bytes": 100})
    )
    assert_failed(table, "big.jpg", "too_large")


def test_a_local_read_allocates_what_the_file_holds_not_the_size_limit(tmp_path):
    (tmp_path / "a.jpg").write_bytes(photo("a"))
    tracemalloc.start()
    try:
        body, reason = read_local(str(tmp_path / "a.jpg"), str(tmp_path), 50_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (body, reason) == (photo("a"), "")
    assert peak < 1_000_000, f"read_local of a {len(body)}-byte file allocated {peak:,} bytes at once"


def test_a_file_that_holds_more_than_its_size_says_is_read_whole_and_still_limited():
    # /proc's files say size 0 and hold more: a file that grew since its size was read reads alike
    status = Path("/proc/self/status")
    body, reason = read_local(str(status), "/proc", 50_000)
    assert reason == "" and body is not None and b"VmRSS" in body
    assert read_local(str(status), "/proc", 10) == (None, "too_large")


def test_a_directory_is_not_a_file(tmp_path):
    make_source(tmp_path, {"sub/c.jpg": photo("c")})
    table = run(records(lambda i: f"cdn/{i}", "sub"), tmp_path)
    assert_failed(table, "sub", "not_found")


HOSTILE = ["../../etc/passwd", "/tmp/x", "a/b", "..", "x" * 300, "../../secret"]


def test_hostile_ids_over_http_only_ever_write_shards(cdn, tmp_path):
    for i in HOSTILE:
        cdn.add(i, photo(i))
    before = files_under(tmp_path)
    table = run(records(cdn.url, *HOSTILE), tmp_path)
    new_files = files_under(tmp_path) - before
    assert new_files and all(
        p.parent == tmp_path / "store" and SHARD_NAME.fullmatch(p.name) for p in new_files
    )
    for i in HOSTILE:
        if i != "..":
            assert_ok(tmp_path, table, i, photo(i))
    assert_failed(table, "..", "http_404")  # '/photo/..' is '/' once the URL is normalised


def test_hostile_ids_as_local_paths_are_refused_or_read_inside_the_source(tmp_path):
    make_source(tmp_path, {"a/b": photo("a/b")})
    (tmp_path / "secret").write_bytes(b"top secret")
    before = files_under(tmp_path)
    table = run(records(lambda i: f"cdn/{quote(i, safe='')}", *HOSTILE), tmp_path)
    assert files_under(tmp_path) - before <= set((tmp_path / "store").glob("shard-*.tar"))
    assert_failed(table, "../../etc/passwd", "path_outside_source")
    assert_failed(table, "../../secret", "path_outside_source")
    assert_failed(table, "/tmp/x", "not_found")  # read as source/cdn/tmp/x, which is not there
    assert_ok(tmp_path, table, "a/b", photo("a/b"))  # inside the source: read, safely
    assert_failed(table, "x" * 300, "not_found")
    assert_failed(table, "..", "path_outside_source")  # cdn/.. is the source folder itself


def test_hostile_ids_in_file_urls_cannot_climb_out(tmp_path):
    base = make_source(tmp_path, {"ok.jpg": photo("ok")})
    (tmp_path / "secret").write_bytes(b"top secret")
    prefix = (base / "cdn").as_uri()
    table = run(records(lambda i: f"{prefix}/{quote(i, safe='')}", "ok.jpg", "../../secret"), tmp_path)
    assert_ok(tmp_path, table, "ok.jpg", photo("ok"))
    assert_failed(table, "../../secret", "bad_url")


def test_absolute_local_path_outside_the_source_is_refused(tmp_path):
    (tmp_path / "secret").write_bytes(b"top secret")
    table = run(records(lambda i: str(tmp_path / "secret"), "x"), tmp_path)
    assert_failed(table, "x", "path_outside_source")


def test_a_source_reads_files_when_any_url_is_a_path_or_a_file_url():
    assert not reads_files(["https://cdn.example.org/photo/1", "HTTP://cdn.example.org/photo/2"])
    assert reads_files(["https://cdn.example.org/photo/1", "cdn/2.jpg"])
    assert reads_files(["file:///data/photos/3.jpg"])
    assert not reads_files([])
