"""The status row (`photoprep.ingest.rows`): one definition that the table, the journal and resume share."""

from __future__ import annotations

import hashlib

import pandas as pd

from photoprep.ingest.journal import Journal, read_journal
from photoprep.ingest.rows import (
    JOURNAL_FIELDS,
    KEY,
    RESULT_COLUMNS,
    FetchRow,
    earlier_rows,
    journal_values,
    table_of,
)


def test_a_stored_row_is_hashed_and_sniffed_and_a_failed_row_keeps_its_reason():
    body = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    ok = FetchRow.stored(body, 200, 2)
    assert (ok.status, ok.reason, ok.sha256, ok.size, ok.mime) == (
        "ok",
        "",
        hashlib.sha256(body).hexdigest(),
        len(body),
        "image/png",
    )
    failed = FetchRow.failed("http_404", 404, 1)
    assert (failed.status, failed.reason, failed.sha256, failed.size) == ("failed", "http_404", "", 0)


def test_the_journal_holds_the_row_before_the_store_places_it():
    assert (*KEY, "url", *(c for c in RESULT_COLUMNS if c not in ("shard", "offset"))) == JOURNAL_FIELDS


def test_a_committed_row_reads_back_from_the_journal_as_the_same_row(tmp_path):
    row = FetchRow.stored(b"\xff\xd8\xff\xe0 a photo", 203, 3)
    journal = Journal(tmp_path)
    journal.commit([journal_values(("s", "a", "https://x/a"), row)], None)
    journal.close()
    committed = read_journal(tmp_path).rows
    assert FetchRow.from_mapping(committed[("s", "a")]) == row
    assert earlier_rows(None, committed)[("s", "a")]["url"] == "https://x/a"


def test_a_finished_tables_ok_rows_are_earlier_rows_and_its_failed_rows_are_not():
    records = pd.DataFrame({"source": ["s", "s"], "id": ["a", "b"], "url": ["u/a", "u/b"]}, index=[7, 3])
    table = table_of(records, [FetchRow.stored(b"data", 200, 1), FetchRow.failed("timeout")])
    assert list(table["id"]) == ["a", "b"] and list(table.index) == [0, 1]  # the records' order
    assert list(records.columns) == ["source", "id", "url"]  # the records as they were
    assert list(table.columns) == ["source", "id", "url", *RESULT_COLUMNS]
    earlier = earlier_rows(table, {})
    assert list(earlier) == [("s", "a")]
    assert FetchRow.from_mapping(earlier[("s", "a")]) == FetchRow.stored(b"data", 200, 1)
