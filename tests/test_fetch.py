"""The download (`photoprep.ingest.fetch`): one row per record, sorted, with its columns carried, and
what a second run reuses."""

from __future__ import annotations

import os

from downloads import (
    FAST,
    assert_ok,
    photo,
    records,
    row,
    run,
)

from photoprep.ingest.fetch import fetch_counts
from photoprep.ingest.rows import RESULT_COLUMNS


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


def test_an_empty_manifest_gives_an_empty_table(tmp_path):
    table = run(records(str, *[]), tmp_path)
    assert table.empty
    assert list(table.columns) == ["source", "id", "url", "title", *RESULT_COLUMNS]


def test_html_served_with_200_is_kept_with_its_mime(cdn, tmp_path):
    page = b"<!DOCTYPE html><html><body>Sorry, this photo moved</body></html>"
    cdn.add("page", page, content_type="image/jpeg")  # the server lies; the bytes do not
    table = run(records(cdn.url, "page"), tmp_path)
    assert_ok(tmp_path, table, "page", page)
    assert row(table, "page")["mime"] == "text/html"


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


def test_no_request_when_every_row_is_reused(cdn, tmp_path):
    cdn.add("a", photo("a"))
    first = run(records(cdn.url, "a"), tmp_path)
    second = run(records(cdn.url, "a"), tmp_path, previous=first)
    assert cdn.total_requests == 1
    assert second.equals(first)
    assert os.listdir(tmp_path / "store") == [first.loc[0, "shard"]]
