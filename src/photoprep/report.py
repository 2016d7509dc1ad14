"""Reports: the counts each stage leaves behind, assembled into the funnel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from photoprep.console import count, reasons
from photoprep.io import write_json, write_table

FUNNEL_ORDER = (
    "lines_read",
    "malformed_lines",
    "repeated_id_lines",
    "unique_ids",
    "labels_unmatched",
    "fetched",
    "fetch_failed",
    "fetch_failed_by_reason",
    "exact_duplicates",
    "near_duplicates",
    "after_dedup",
    "broken",
    "broken_by_reason",
    "valid",
    "bucket_dropped",
    "kept",
    "kept_per_bucket",
    "split",
)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif isinstance(value, int | float):
            total[key] = total.get(key, 0) + value


def _sorted_counts(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: _sorted_counts(v) if isinstance(v, dict) else v for k, v in sorted(counts.items())}


def funnel(download: dict[str, dict[str, Any]], stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The count after each step, summed over sources, in pipeline order; per source beneath.

    `download` maps a source to its download counts; `stages` maps a later stage to its counts.
    """
    totals: dict[str, Any] = {}
    for counts in download.values():
        _add(totals, counts)
    for counts in stages.values():
        _add(totals, counts)
    ordered = {key: totals.pop(key) for key in FUNNEL_ORDER if key in totals}
    ordered = {k: _sorted_counts(v) if isinstance(v, dict) else v for k, v in ordered.items()}
    ordered.update(_sorted_counts(totals))
    ordered["per_source"] = {name: _sorted_counts(counts) for name, counts in sorted(download.items())}
    return ordered


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
    known = set(records["id"])
    return labels[~labels["id"].isin(known)].sort_values("id", kind="mergesort").reset_index(drop=True)


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
