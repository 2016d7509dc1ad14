"""The validate stage's verdict: every remaining image valid, or broken with its reason.

Two verdicts, one module each. The decode's verdict on the bytes (``zero_bytes``,
``not_an_image``, ``truncated``, ``corrupt``, ``too_many_pixels``, ``over_budget``,
``unsupported``: `photoprep.images.reasons`) is the dedup stage's: its probe (`photoprep.images.probe`)
must decode every payload to hash it, under the limits of params.yaml's `decode` section, and
writes it as ``decode_reason``. This module gives the dataset's verdict on what dedup left: the
decode's reason, else what needs no pixels (``too_small``, `validate.min_side`).
"""

from __future__ import annotations

import pandas as pd

from photoprep.core.params import ValidateParams

VALID_COLUMNS = ["format", "width", "height", "mode", "valid", "reason"]


def validate_images(deduped: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """The fetched, non-duplicate records, each with `valid` and a `reason` when it is not."""
    chosen = ((deduped["status"] == "ok") & (deduped["dup_of"] == "")).to_numpy()
    # One copy of the chosen rows, of the columns that stay (a copy of every column, then of the
    # ones kept, held the slice twice more).
    keep = [c for c in deduped.columns if c not in ("decode_reason", "status", "fetch_reason")]
    remaining = deduped.loc[chosen, keep].reset_index(drop=True)
    reason = deduped.loc[chosen, "decode_reason"].fillna("").astype(str).reset_index(drop=True)
    too_small = (reason == "") & (remaining[["width", "height"]].min(axis=1) < p.min_side)
    reason = reason.mask(too_small, "too_small")
    remaining["reason"] = reason
    remaining["valid"] = reason == ""
    return remaining


def validate_counts(valid: pd.DataFrame) -> dict:
    """Funnel counts: broken by reason, and valid."""
    broken = valid[~valid["valid"]]
    return {
        "broken": len(broken),
        "broken_by_reason": {str(k): int(v) for k, v in broken["reason"].value_counts().sort_index().items()},
        "valid": int(valid["valid"].sum()),
    }


def add_counts(total: dict | None, more: dict) -> dict:
    """`validate_counts` of two slices of the table together (`total` None: `more` alone)."""
    if total is None:
        return more
    by_reason = dict(total["broken_by_reason"])
    for reason, n in more["broken_by_reason"].items():
        by_reason[reason] = by_reason.get(reason, 0) + n
    return {
        "broken": total["broken"] + more["broken"],
        "broken_by_reason": dict(sorted(by_reason.items())),
        "valid": total["valid"] + more["valid"],
    }


def broken_report(valid: pd.DataFrame) -> pd.DataFrame:
    """reports/broken.csv: what was rejected and why."""
    columns = ["source", "id", "url", "reason", "mime", "size", "format", "width", "height", "mode"]
    return valid.loc[~valid["valid"], [c for c in columns if c in valid.columns]].reset_index(drop=True)
