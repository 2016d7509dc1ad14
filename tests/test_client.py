"""The client against a real loopback CDN with injected faults (`photoprep.ingest.client`): what each fault
ends as, what is retried, and where redirects may go."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
from downloads import (
    FAST,
    assert_failed,
    assert_ok,
    photo,
    records,
    row,
    run,
)

from photoprep.ingest.client import parse_retry_after


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


def test_redirect_loop_is_too_many_redirects(cdn, tmp_path):
    cdn.redirect("loop", "/photo/loop")
    table = run(records(cdn.url, "loop"), tmp_path, FAST.model_copy(update={"max_redirects": 3}))
    assert_failed(table, "loop", "too_many_redirects")
    assert cdn.requests_for("loop") == 4


def test_redirect_to_a_file_url_is_refused(cdn, tmp_path):
    cdn.redirect("x", "file:///etc/passwd")
    table = run(records(cdn.url, "x"), tmp_path, allow_cross_host=True)
    assert_failed(table, "x", "bad_redirect")


def test_user_agent_is_sent(cdn, tmp_path):
    cdn.add("x", photo("x"))
    run(records(cdn.url, "x"), tmp_path, FAST.model_copy(update={"user_agent": "photoprep-test/1"}))
    assert [h["User-Agent"] for h in cdn.headers_for("x")] == ["photoprep-test/1"]
