"""Validity: every remaining image was fully decoded once; here each gets its verdict and reason.

The decode itself happens in the single-pass probe (`photoprep.images.probe`), which the
dedup stage runs on every fetched payload. This module adds the checks that need no pixels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from photoprep.params import ValidateParams

REASONS = (
    "zero_bytes",
    "not_an_image",
    "truncated",
    "corrupt",
    "too_small",
    "too_many_pixels",
    "over_budget",
    "unsupported",
)

VALID_COLUMNS = ["format", "width", "height", "mode", "valid", "reason"]


def validate_images(deduped: pd.DataFrame, p: ValidateParams) -> pd.DataFrame:
    """The fetched, non-duplicate records, each with `valid` and a `reason` when it is not."""
    remaining = deduped[(deduped["status"] == "ok") & (deduped["dup_of"] == "")].copy()
    reason = remaining["decode_reason"].fillna("").astype(str)
    decoded = reason == ""
    too_many = decoded & (
        remaining["width"].astype(np.int64) * remaining["height"].astype(np.int64) > p.max_pixels
    )
    too_small = decoded & ~too_many & (remaining[["width", "height"]].min(axis=1) < p.min_side)
    reason = reason.mask(too_many, "too_many_pixels").mask(too_small, "too_small")
    remaining["reason"] = reason
    remaining["valid"] = reason == ""
    keep = [c for c in remaining.columns if c not in ("decode_reason", "status", "fetch_reason")]
    return remaining[keep].reset_index(drop=True)


def validate_counts(valid: pd.DataFrame) -> dict:
    """Funnel counts: broken by reason, and valid."""
    broken = valid[~valid["valid"]]
    return {
        "broken": len(broken),
        "broken_by_reason": {str(k): int(v) for k, v in broken["reason"].value_counts().sort_index().items()},
        "valid": int(valid["valid"].sum()),
    }


def broken_report(valid: pd.DataFrame) -> pd.DataFrame:
    """reports/broken.csv: what was rejected and why."""
    columns = ["source", "id", "url", "reason", "mime", "size", "format", "width", "height", "mode"]
    return valid.loc[~valid["valid"], [c for c in columns if c in valid.columns]].reset_index(drop=True)
