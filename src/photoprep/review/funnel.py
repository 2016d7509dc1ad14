"""The funnel: the counts each stage leaves behind, summed over sources, in pipeline order.

The funnel stage's work: `reports/funnel.json` holds the count after each step (lines read,
malformed lines, unique ids, fetched, failed by reason, exact and near duplicates, broken by
reason, kept per bucket, per split), so a run reads like the original hand-made one.
"""

from __future__ import annotations

from typing import Any

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
