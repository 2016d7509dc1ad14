"""fetch_all against a real loopback CDN with injected faults: what each fault must end as."""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
from yarl import URL

from photoprep.ingest.fetch import RESULT_COLUMNS, fetch_all, fetch_counts, parse_retry_after, same_host
from photoprep.ingest.store import SHARD_NAME, read_blobs
from photoprep.params import DownloadParams

# Timeouts generous enough for a busy test machine; backoff short enough for a fast suite.
FAST = DownloadParams(
    concurrency=8,
    per_host=8,
    connect_timeout=2.0,
    read_timeout=0.8,
    retries=3,
    backoff_base=0.01,
    backoff_max=0.5,
)


def photo(id_: str, size: int = 3000) -> bytes:
    """Bytes that sniff as a JPEG, different for every id."""
    seed = hashlib.sha256(id_.encode()).digest()
    return (b"\xff\xd8\xff\xe0" + seed * (size // 32 + 1))[:size]


def records(url_of, *ids: str, source: str = "demo") -> pd.DataFrame:
    """Manifest records for `ids`; `url_of(id)` gives the url (e.g. cdn.url)."""
    return pd.DataFrame(
        {
            "source": source,
            "id": list(ids),
            "url": [url_of(i) for i in ids],
            "title": [f"title of {i}" for i in ids],
        }
    )


def run(recs: pd.DataFrame, tmp_path: Path, p: DownloadParams = FAST, **kwargs) -> pd.DataFrame:
    """fetch_all into tmp_path/store, with tmp_path/source as the source folder."""
    kwargs.setdefault("base_dir", tmp_path / "source")
    return fetch_all(recs, tmp_path / "store", p, progress=False, **kwargs)


def row(table: pd.DataFrame, id_: str) -> pd.Series:
    (match,) = table.index[table["id"] == id_]
    return table.loc[match]


def stored(tmp_path: Path, r: pd.Series) -> bytes:
    """The bytes the store holds for a result row."""
    (data,) = read_blobs(tmp_path / "store", [(r["shard"], r["offset"], r["size"])])
    return data


def assert_ok(tmp_path: Path, table: pd.DataFrame, id_: str, data: bytes) -> None:
    r = row(table, id_)
    assert (r["status"], r["reason"]) == ("ok", "")
    assert r["sha256"] == hashlib.sha256(data).hexdigest()
    assert r["size"] == len(data)
    assert stored(tmp_path, r) == data


def assert_failed(table: pd.DataFrame, id_: str, reason: str) -> None:
    r = row(table, id_)
    assert (r["status"], r["reason"]) == ("failed", reason)
    assert (r["sha256"], r["size"], r["shard"]) == ("", 0, "")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# -- the table -----------------------------------------------------------------------------


def test_every_record_gets_one_row_sorted_by_id_with_its_columns_carried(cdn, tmp_path):
    ids = ["c", "a", "b"]
    for i in ids:
        cdn.add(i, photo(i))
    table = run(records(cdn.url, *ids), tmp_path)
    assert list(table.columns) == ["source", "id", "url", "title", *RESULT_COLUMNS]
    assert list(table["id"]) == ["a", "b", "c"]
    assert list(table["title"]) == ["title of a", "title of b", "title of c"]
    for i in ids:
        assert_ok(tmp_path, table, i, photo(i))
    assert set(table["mime"]) == {"image/jpeg"}
    assert list(table["http_status"]) == [200, 200, 200]
    assert list(table["attempts"]) == [1, 1, 1]


def test_two_fresh_runs_give_identical_tables_and_shards(cdn, tmp_path):
    ids = [f"img{i:03d}" for i in range(40)] + ["gone"]
    for i in ids[:-1]:
        cdn.add(i, photo(i, 1000 + 37 * int(i[3:])))
    first = run(records(cdn.url, *ids), tmp_path / "one")
    second = run(records(cdn.url, *ids), tmp_path / "two")
    pd.testing.assert_frame_equal(first, second)
    shards_one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "store").iterdir()}
    shards_two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "store").iterdir()}
    assert shards_one == shards_two


def test_shards_do_not_depend_on_the_order_responses_arrive_in(cdn, tmp_path):
    ids = [f"img{i:02d}" for i in range(12)]
    for i in ids:
        cdn.add(i, photo(i))
    cdn.slow("img00", 0.2)  # the first record answers last
    first = run(records(cdn.url, *ids), tmp_path / "one")
    cdn.slow("img11", 0.2)  # now the last one does
    second = run(records(cdn.url, *reversed(ids)), tmp_path / "two")
    pd.testing.assert_frame_equal(first, second)
    shards_one = {p.name: p.read_bytes() for p in (tmp_path / "one" / "store").iterdir()}
    shards_two = {p.name: p.read_bytes() for p in (tmp_path / "two" / "store").iterdir()}
    assert shards_one == shards_two


def test_bodies_waiting_behind_a_slow_one_spill_to_disk_and_keep_their_order(cdn, tmp_path):
    ids = [f"img{i:02d}" for i in range(20)]
    for i in ids:
        cdn.add(i, photo(i, 100_000))
    cdn.slow("img00", 0.25)
    p = FAST.model_copy(update={"shard_mb": 1})  # 1 MiB of waiting bodies in memory, then the spill file
    table = run(records(cdn.url, *ids), tmp_path, p)
    for i in ids:
        assert_ok(tmp_path, table, i, photo(i, 100_000))
    assert all(SHARD_NAME.fullmatch(f.name) for f in (tmp_path / "store").iterdir())  # spill removed
    by_place = table.sort_values(["shard", "offset"])
    for _, shard in by_place.groupby("shard"):
        assert list(shard["id"]) == sorted(shard["id"])  # stored in record order


def test_an_empty_manifest_gives_an_empty_table(tmp_path):
    table = run(records(str, *[]), tmp_path)
    assert table.empty
    assert list(table.columns) == ["source", "id", "url", "title", *RESULT_COLUMNS]


# -- faults that end in failure, with their reason ------------------------------------------


@pytest.mark.parametrize("status", [404, 410, 403])
def test_client_errors_are_recorded_and_not_retried(cdn, tmp_path, status):
    cdn.fail("x", status=status, times=None)
    table = run(records(cdn.url, "x"), tmp_path)
    assert_failed(table, "x", f"http_{status}")
    assert row(table, "x")["http_status"] == status
    assert cdn.requests_for("x") == 1


def test_unknown_id_is_http_404(cdn, tmp_path):
    table = run(records(cdn.url, "nobody"), tmp_path)
    assert_failed(table, "nobody", "http_404")


def test_persistent_500_fails_after_every_retry(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.fail("x", status=500, times=None)
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"retries": 2}))
    assert_failed(table, "x", "http_500")
    assert row(table, "x")["attempts"] == 3
    assert cdn.requests_for("x") == 3


def test_persistent_429_fails_as_http_429(cdn, tmp_path):
    cdn.retry_after("x", 0, times=None)
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"retries": 1}))
    assert_failed(table, "x", "http_429")
    assert cdn.requests_for("x") == 2


def test_response_slower_than_the_read_timeout_every_time_is_a_timeout(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.slow("x", 2.0, times=None)
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"retries": 1}))
    assert_failed(table, "x", "timeout")
    assert row(table, "x")["http_status"] == 0
    assert row(table, "x")["attempts"] == 2


def test_body_truncated_every_time_is_truncated_body(cdn, tmp_path):
    cdn.add("x", photo("x", 50_000))
    cdn.truncate("x", times=None)
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"retries": 1}))
    assert_failed(table, "x", "truncated_body")


def test_refused_connection_is_connect_error(tmp_path):
    url = "http://127.0.0.1:9/photo/x"  # the discard port: nothing listens there
    table = run(records(lambda i: url, "x"), tmp_path, FAST.model_copy(update={"retries": 1}))
    assert_failed(table, "x", "connect_error")
    assert row(table, "x")["attempts"] == 2


def test_announced_size_over_the_limit_is_too_large_without_retry(cdn, tmp_path):
    cdn.add("big", photo("big", 20_000))
    table = run(records(cdn.url, "big"), tmp_path, FAST.model_copy(update={"max_bytes": 10_000}))
    assert_failed(table, "big", "too_large")
    assert cdn.requests_for("big") == 1


def test_streamed_body_over_the_limit_is_too_large(cdn, tmp_path):
    cdn.add("big", photo("big", 100_000), chunked=True)
    cdn.add("small", photo("small", 5_000), chunked=True)
    table = run(records(cdn.url, "big", "small"), tmp_path, FAST.model_copy(update={"max_bytes": 10_000}))
    assert_failed(table, "big", "too_large")
    assert_ok(tmp_path, table, "small", photo("small", 5_000))


@pytest.mark.parametrize("url", ["ftp://example.org/x", "http://", "http://h:99999/x", "", "gopher://x/y"])
def test_urls_that_cannot_be_fetched_are_bad_url(tmp_path, url):
    table = run(records(lambda i: url, "x"), tmp_path)
    assert_failed(table, "x", "bad_url")


# -- faults that are recovered -------------------------------------------------------------


def test_transient_500_is_retried_and_recovered(cdn, tmp_path):
    cdn.add("a1", photo("a1"))
    cdn.fail("a1", status=500, times=2)
    table = run(records(cdn.url, "a1"), tmp_path)
    assert_ok(tmp_path, table, "a1", photo("a1"))
    assert row(table, "a1")["attempts"] == 3
    assert cdn.requests_for("a1") == 3


def test_503_is_retried(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.fail("x", status=503, times=1)
    table = run(records(cdn.url, "x"), tmp_path)
    assert_ok(tmp_path, table, "x", photo("x"))


def test_429_retry_after_seconds_is_honoured(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.retry_after("x", 0.4)
    table = run(records(cdn.url, "x"), tmp_path)
    assert_ok(tmp_path, table, "x", photo("x"))
    (first, _), (second, _) = cdn.request_log()
    assert second - first >= 0.38


def test_429_pauses_the_whole_host_not_just_one_request(cdn, tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    for i in ids:
        cdn.add(i, photo(i))
    cdn.retry_after("a", 0.4)
    p = FAST.model_copy(update={"concurrency": 1})
    table = run(records(cdn.url, *ids), tmp_path, p)
    assert (table["status"] == "ok").all()
    log = cdn.request_log()
    t_429 = next(t for t, i in log if i == "a")
    later = [t for t, _ in log if t > t_429]
    assert later, "some request followed the 429"
    assert min(later) - t_429 >= 0.38  # nobody asked the host during its pause


def test_retry_after_over_backoff_max_is_capped(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.retry_after("x", 3600)
    started = time.monotonic()
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"backoff_max": 0.2}))
    assert_ok(tmp_path, table, "x", photo("x"))
    assert time.monotonic() - started < 5


def test_retry_after_as_an_http_date_is_honoured(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.retry_after("x", formatdate(time.time() + 1.5, usegmt=True))
    table = run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"backoff_max": 5}))
    assert_ok(tmp_path, table, "x", photo("x"))
    (first, _), (second, _) = cdn.request_log()
    assert second - first >= 0.4  # an HTTP date has 1 s resolution: at least ~0.5 s was left


def test_retry_after_parses_seconds_and_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_response_slower_than_the_read_timeout_once_is_retried(cdn, tmp_path):
    cdn.add("x", photo("x"))
    cdn.slow("x", 2.0, times=1)
    table = run(records(cdn.url, "x"), tmp_path)
    assert_ok(tmp_path, table, "x", photo("x"))
    assert row(table, "x")["attempts"] == 2


def test_truncated_body_once_is_retried(cdn, tmp_path):
    cdn.add("x", photo("x", 50_000))
    cdn.truncate("x", times=1)
    table = run(records(cdn.url, "x"), tmp_path)
    assert_ok(tmp_path, table, "x", photo("x", 50_000))
    assert row(table, "x")["attempts"] == 2


# -- what the fetcher keeps ----------------------------------------------------------------


def test_html_served_with_200_is_kept_with_its_mime(cdn, tmp_path):
    page = b"<!DOCTYPE html><html><body>Sorry, this photo moved</body></html>"
    cdn.add("page", page, content_type="image/jpeg")  # the server lies; the bytes do not
    table = run(records(cdn.url, "page"), tmp_path)
    assert_ok(tmp_path, table, "page", page)
    assert row(table, "page")["mime"] == "text/html"


def test_byte_identical_payloads_are_stored_once(cdn, tmp_path):
    same = photo("shared")
    for i in ["a", "b", "c"]:
        cdn.add(i, same)
    table = run(records(cdn.url, "a", "b", "c"), tmp_path)
    assert table["sha256"].nunique() == 1
    assert table[["shard", "offset"]].drop_duplicates().shape[0] == 1
    (shard,) = (tmp_path / "store").iterdir()
    with tarfile.open(shard) as archive:
        assert archive.getnames() == [hashlib.sha256(same).hexdigest()]


# -- redirects -----------------------------------------------------------------------------


def test_same_host_redirect_is_followed(cdn, tmp_path):
    cdn.add("new", photo("new"))
    cdn.redirect("old", "/photo/new")
    table = run(records(cdn.url, "old"), tmp_path)
    assert_ok(tmp_path, table, "old", photo("new"))
    assert cdn.requests_for("new") == 1


def test_redirect_to_another_host_is_refused(cdn, other_cdn, tmp_path):
    other_cdn.add("x", photo("x"))
    cdn.redirect("x", other_cdn.url("x"))
    table = run(records(cdn.url, "x"), tmp_path)
    assert_failed(table, "x", "redirect_cross_host")
    assert row(table, "x")["http_status"] == 302
    assert other_cdn.total_requests == 0


def test_another_port_on_the_same_hostname_is_another_host(cdn, other_cdn, tmp_path):
    other_cdn.add("x", photo("x"))
    cdn.redirect("x", f"http://127.0.0.1:{other_cdn.port}/photo/x")
    table = run(records(cdn.url, "x"), tmp_path)
    assert_failed(table, "x", "redirect_cross_host")


def test_cross_host_redirect_is_followed_when_allowed(cdn, other_cdn, tmp_path):
    other_cdn.add("x", photo("x"))
    cdn.redirect("x", other_cdn.url("x"))
    table = run(records(cdn.url, "x"), tmp_path, allow_cross_host=True)
    assert_ok(tmp_path, table, "x", photo("x"))


def test_an_upgrade_to_https_on_the_same_hostname_is_the_same_host():
    assert same_host(URL("http://cdn.example.org/photo/1"), URL("https://cdn.example.org/photo/1"))
    assert not same_host(URL("https://cdn.example.org/photo/1"), URL("http://cdn.example.org/photo/1"))
    assert not same_host(URL("http://cdn.example.org:8080/a"), URL("https://cdn.example.org/a"))
    assert not same_host(URL("http://cdn.example.org/a"), URL("http://img.example.org/a"))


def test_redirect_loop_is_too_many_redirects(cdn, tmp_path):
    cdn.redirect("loop", "/photo/loop")
    table = run(records(cdn.url, "loop"), tmp_path, FAST.model_copy(update={"max_redirects": 3}))
    assert_failed(table, "loop", "too_many_redirects")
    assert cdn.requests_for("loop") == 4


def test_redirect_to_a_file_url_is_refused(cdn, tmp_path):
    cdn.redirect("x", "file:///etc/passwd")
    table = run(records(cdn.url, "x"), tmp_path, allow_cross_host=True)
    assert_failed(table, "x", "bad_redirect")


# -- local files ---------------------------------------------------------------------------


def make_source(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A source folder with files under cdn/ (names relative to it)."""
    base = tmp_path / "source"
    for name, data in files.items():
        path = base / "cdn" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return base


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


def test_a_directory_is_not_a_file(tmp_path):
    make_source(tmp_path, {"sub/c.jpg": photo("c")})
    table = run(records(lambda i: f"cdn/{i}", "sub"), tmp_path)
    assert_failed(table, "sub", "not_found")


# -- hostile ids ---------------------------------------------------------------------------

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


# -- resume --------------------------------------------------------------------------------


def test_second_run_reuses_what_was_fetched_and_retries_what_failed(cdn, tmp_path):
    for i in ["a", "b", "c"]:
        cdn.add(i, photo(i))
    cdn.fail("c", status=500, times=None)
    recs = records(cdn.url, "a", "b", "c", "d")
    first = run(recs, tmp_path, FAST.model_copy(update={"retries": 0}))
    assert list(first["status"]) == ["ok", "ok", "failed", "failed"]

    cdn.add("d", photo("d"))
    cdn.heal()
    asked_before = {i: cdn.requests_for(i) for i in "abcd"}
    second = run(recs, tmp_path, previous=first)
    asked = {i: cdn.requests_for(i) - asked_before[i] for i in "abcd"}
    assert asked == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert (second["status"] == "ok").all()
    # a reused row keeps its columns, attempts included: a resumed table equals a fresh one
    assert list(second["attempts"]) == [1, 1, 1, 1]
    for i in "abcd":
        assert_ok(tmp_path, second, i, photo(i))


def test_rows_whose_shard_is_gone_or_url_changed_are_fetched_again(cdn, tmp_path):
    for i in ["a", "b"]:
        cdn.add(i, photo(i))
    first = run(records(cdn.url, "a", "b"), tmp_path)
    for shard in (tmp_path / "store").iterdir():
        shard.unlink()
    second = run(records(cdn.url, "a", "b"), tmp_path, previous=first)
    assert cdn.requests_for("a") == 2
    assert_ok(tmp_path, second, "a", photo("a"))

    cdn.add("a2", photo("a2"))
    moved = records(cdn.url, "a", "b")
    moved.loc[0, "url"] = cdn.url("a2")
    third = run(moved, tmp_path, previous=second)
    assert_ok(tmp_path, third, "a", photo("a2"))
    assert cdn.requests_for("b") == 2  # unchanged: reused


def test_fetch_counts_sum_up_the_table(cdn, tmp_path):
    cdn.add("a", photo("a", 1000))
    cdn.add("b", photo("b", 2000))
    table = run(records(cdn.url, "a", "b", "gone", "bad"), tmp_path)
    table.loc[table["id"] == "bad", ["status", "reason"]] = ["failed", "bad_url"]
    counts = fetch_counts(table)
    assert counts["fetched"] == 2
    assert counts["failed"] == 2
    assert counts["failed_by_reason"] == {"bad_url": 1, "http_404": 1}
    assert counts["bytes"] == 3000


def test_user_agent_is_sent(cdn, tmp_path):
    cdn.add("x", photo("x"))
    run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"user_agent": "photoprep-test/1"}))
    assert [h["User-Agent"] for h in cdn.headers_for("x")] == ["photoprep-test/1"]


def test_no_request_when_every_row_is_reused(cdn, tmp_path):
    cdn.add("a", photo("a"))
    first = run(records(cdn.url, "a"), tmp_path)
    second = run(records(cdn.url, "a"), tmp_path, previous=first)
    assert cdn.total_requests == 1
    assert second.equals(first)
    assert os.listdir(tmp_path / "store") == [first.loc[0, "shard"]]
