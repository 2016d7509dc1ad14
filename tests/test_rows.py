"""The status row (`photoprep.ingest.rows`): one definition that the table, the journal and resume share."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from photoprep.ingest.journal import Journal, read_journal
from photoprep.ingest.rows import (
    JOURNAL_FIELDS,
    KEY,
    RESULT_COLUMNS,
    FetchRow,
    Results,
    earlier_frame,
    journal_values,
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
    earlier = earlier_frame(None, read_journal(tmp_path).rows)
    assert earlier[["url", "journal"]].values.tolist() == [["https://x/a", True]]
    results = Results(2)
    results.fill(np.array([1]), earlier)
    assert results.row(1) == row
    assert results.row(0).status == ""  # no row recorded there


def test_rows_recorded_one_at_a_time_read_back_as_they_went_in_and_make_the_table():
    rows = [FetchRow.stored(b"data", 200, 1), FetchRow.failed("timeout"), FetchRow.failed("http_404", 404, 2)]
    results = Results(3)
    for position, row in enumerate(rows):
        results.record(position, row)
    assert [results.row(i) for i in range(3)] == rows
    assert results.ok().tolist() == [True, False, False]
    records = pd.DataFrame({"source": ["s"] * 3, "id": ["a", "b", "c"], "url": ["u/a", "u/b", "u/c"]})
    table = results.table(records)
    assert table["reason"].tolist() == ["", "timeout", "http_404"]
    assert table["sha256"].tolist() == [hashlib.sha256(b"data").hexdigest(), "", ""]
    assert table["http_status"].tolist() == [200, 0, 404] and str(table["size"].dtype) == "int64"
    assert results.take(np.array([2])).row(0) == rows[2]  # taken rows keep their texts


def test_a_finished_tables_ok_rows_are_earlier_rows_and_its_failed_rows_are_not():
    records = pd.DataFrame({"source": ["s", "s"], "id": ["a", "b"], "url": ["u/a", "u/b"]}, index=[7, 3])
    results = Results(2)
    results.record(0, FetchRow.stored(b"data", 200, 1))
    results.record(1, FetchRow.failed("timeout"))
    table = results.table(records)
    assert list(table["id"]) == ["a", "b"] and list(table.index) == [0, 1]  # the records' order
    assert list(records.columns) == ["source", "id", "url"]  # the records as they were
    assert list(table.columns) == ["source", "id", "url", *RESULT_COLUMNS]
    earlier = earlier_frame(table, {})
    assert earlier[list(KEY)].values.tolist() == [["s", "a"]]
    again = Results(1)
    again.fill(np.array([0]), earlier)
    assert again.row(0) == FetchRow.stored(b"data", 200, 1)


def test_rows_an_interrupted_run_committed_override_the_finished_tables():
    records = pd.DataFrame({"source": ["s"], "id": ["a"], "url": ["u/a"]})
    results = Results(1)
    results.record(0, FetchRow.stored(b"old", 200, 1))
    newer = FetchRow.stored(b"new", 200, 2)
    committed = {("s", "a"): dict(zip(JOURNAL_FIELDS, journal_values(("s", "a", "u/a"), newer), strict=True))}
    earlier = earlier_frame(results.table(records), committed)
    assert len(earlier) == 1 and bool(earlier["journal"].iloc[0])
    assert earlier["sha256"].iloc[0] == newer.sha256
