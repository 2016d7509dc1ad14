"""The download's reports: counts, malformed lines, failed fetches and unmatched labels of a source.

`counts.json` is the source's part of the funnel (`photoprep.review.funnel`); `malformed.csv`,
`failed.csv` and `labels_unmatched.csv` list every line and id that went nowhere, with its
reason. `fetched_cause` says in one line why the download tables hold no image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from photoprep.core.console import count, reasons
from photoprep.core.io import write_json, write_table


def download_counts(listed: Any, table: pd.DataFrame, unmatched_labels: int = 0) -> dict[str, Any]:
    """Funnel counts of one source: lines, malformed lines, unique ids, label rows matching no id,
    fetched, failed by reason."""
    failed = table[table["status"] != "ok"]
    return {
        "lines_read": int(listed.lines_read),
        "malformed_lines": len(listed.malformed),
        "unique_ids": len(listed.records),
        "repeated_id_lines": int(listed.lines_read - len(listed.malformed) - len(listed.records)),
        "labels_unmatched": int(unmatched_labels),
        "fetched": int((table["status"] == "ok").sum()),
        "fetch_failed": len(failed),
        "fetch_failed_by_reason": {
            str(k): int(v) for k, v in failed["reason"].value_counts().sort_index().items()
        },
    }


def unmatched_labels(labels: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Rows of a labels table whose id is no id of the manifest, sorted by id."""
    if labels.empty:
        return labels.reset_index(drop=True)
    # Arrow's is_in of the columns as they are: pandas' isin made a Python string of every id
    # (20,200 ids held 5.6 MB more for the rest of the stage).
    listed = pc.is_in(pa.array(labels["id"]), value_set=pa.array(records["id"]))
    unmatched = ~np.asarray(listed, dtype=bool)
    return labels[unmatched].sort_values("id", kind="mergesort").reset_index(drop=True)


def fetched_cause(table: pd.DataFrame) -> str:
    """Why a download table holds no image, per source.

    'download@heobs fetched 0 of 2,000 (connect_error 2,000)'. Takes the raw tables as the dedup
    stage reads them (the fetch reason in `reason` or `fetch_reason`).
    """
    if table.empty:
        return "the download tables hold no id (are the manifests empty?)"
    column = "fetch_reason" if "fetch_reason" in table.columns else "reason"
    parts = []
    for source, rows in table.groupby("source", sort=True):
        ok = rows["status"] == "ok"
        why = reasons(rows.loc[~ok, column])
        parts.append(
            f"download@{source} fetched {count(int(ok.sum()))} of {count(len(rows))}"
            + (f" ({why})" if why else "")
        )
    return "; ".join(parts)


def write_download_reports(
    name: str, listed: Any, table: pd.DataFrame, folder: Path, labels: pd.DataFrame | None = None
) -> None:
    """counts.json, malformed.csv (line numbers and reasons), failed.csv and labels_unmatched.csv
    (label rows whose id the manifest does not list) of one source."""
    unmatched = unmatched_labels(labels, listed.records) if labels is not None else None
    write_json(
        download_counts(listed, table, 0 if unmatched is None else len(unmatched)), folder / "counts.json"
    )
    write_table(listed.malformed, folder / "malformed.csv")
    failed = table.loc[table["status"] != "ok", ["source", "id", "url", "reason", "http_status", "attempts"]]
    write_table(failed, folder / "failed.csv")
    if unmatched is not None:
        write_table(unmatched, folder / "labels_unmatched.csv")
