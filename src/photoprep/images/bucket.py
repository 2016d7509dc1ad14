"""Resolution buckets: group near-equal sizes, choose which buckets to keep, one output size.

Sizes within `tolerance_px` of each other, in both width and height, join one bucket (single
linkage, so 200x120 ... 200x165 in 5 px steps becomes one bucket, as the original grouping by
eye did). The kept images are resized to `size` by `fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core.io import write_with
from photoprep.core.params import BucketKeep, BucketParams
from photoprep.images import graph


@dataclass
class BucketResult:
    table: pd.DataFrame  # every valid image with its bucket and whether it is kept
    resolutions: pd.DataFrame  # width, height, count, bucket, kept: one row per distinct size
    buckets: pd.DataFrame  # bucket, min/max width and height, count, kept


def _linked_sizes(sizes: np.ndarray, tolerance: int) -> np.ndarray:
    """Component label of each distinct (w, h) under 'both sides within tolerance' links."""
    order = np.lexsort((sizes[:, 1], sizes[:, 0]))
    w, h = sizes[order, 0], sizes[order, 1]
    src, dst = [], []
    for i in range(len(order)):
        j = i + 1
        # Sorted by width, so only the next few sizes can be within tolerance.
        while j < len(order) and w[j] - w[i] <= tolerance:
            if abs(int(h[j]) - int(h[i])) <= tolerance:
                src.append(order[i])
                dst.append(order[j])
            j += 1
    n = len(sizes)
    return graph.components(n, src, dst)


def bucket_name(min_w: int, min_h: int, max_w: int, max_h: int) -> str:
    """'64x64' for one size, '200x120..200x165' for a range (width x height)."""
    low = f"{min_w}x{min_h}"
    return low if (min_w, min_h) == (max_w, max_h) else f"{low}..{max_w}x{max_h}"


def _selected(buckets: pd.DataFrame, keep: str | BucketKeep, min_count: int) -> pd.Series:
    chosen = buckets["count"] >= min_count
    if isinstance(keep, BucketKeep):
        if keep.ranges is not None:
            inside = pd.Series(False, index=buckets.index)
            for r in keep.ranges:
                inside |= (
                    (buckets["min_width"] >= r.width[0])
                    & (buckets["max_width"] <= r.width[1])
                    & (buckets["min_height"] >= r.height[0])
                    & (buckets["max_height"] <= r.height[1])
                )
            chosen &= inside
        if keep.top_k is not None:
            ranked = buckets[chosen].sort_values(["count", "bucket"], ascending=[False, True], kind="stable")
            chosen &= buckets.index.isin(ranked.head(keep.top_k).index)
    return chosen


def assign_buckets(valid: pd.DataFrame, p: BucketParams) -> BucketResult:
    """Bucket every valid image by resolution and mark the buckets that `p.keep` selects."""
    images = valid[valid["valid"]].sort_values(["source", "id"], kind="stable").reset_index(drop=True)
    sizes = images[["width", "height"]].astype(np.int64)
    resolutions = sizes.value_counts().rename("count").reset_index().sort_values(["width", "height"])
    resolutions = resolutions.reset_index(drop=True)
    if resolutions.empty:
        empty = pd.DataFrame(
            columns=["bucket", "min_width", "min_height", "max_width", "max_height", "count", "kept"]
        )
        return BucketResult(
            images.assign(bucket="", kept=False), resolutions.assign(bucket="", kept=False), empty
        )
    resolutions["component"] = _linked_sizes(resolutions[["width", "height"]].to_numpy(), p.tolerance_px)
    grouped = resolutions.groupby("component")
    buckets = pd.DataFrame(
        {
            "min_width": grouped["width"].min(),
            "min_height": grouped["height"].min(),
            "max_width": grouped["width"].max(),
            "max_height": grouped["height"].max(),
            "count": grouped["count"].sum(),
        }
    )
    buckets.insert(
        0,
        "bucket",
        [
            bucket_name(*row)
            for row in buckets[["min_width", "min_height", "max_width", "max_height"]].itertuples(index=False)
        ],
    )
    buckets["kept"] = _selected(buckets, p.keep, p.min_count)
    resolutions["bucket"] = buckets.loc[resolutions["component"], "bucket"].to_numpy()
    resolutions["kept"] = buckets.loc[resolutions["component"], "kept"].to_numpy()
    resolutions = resolutions.drop(columns="component")
    lookup = resolutions.set_index(["width", "height"])
    keys = pd.MultiIndex.from_frame(sizes)
    images["bucket"] = lookup.loc[keys, "bucket"].to_numpy()
    images["kept"] = lookup.loc[keys, "kept"].to_numpy()
    buckets = buckets.sort_values(["count", "bucket"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )
    return BucketResult(images, resolutions, buckets)


def bucket_counts(result: BucketResult) -> dict:
    """Funnel counts: images dropped for their bucket, kept, kept per bucket."""
    kept = result.table[result.table["kept"]]
    return {
        "bucket_dropped": int((~result.table["kept"]).sum()),
        "kept": len(kept),
        "kept_per_bucket": {str(k): int(v) for k, v in kept["bucket"].value_counts().sort_index().items()},
    }


def plot_resolutions(result: BucketResult, path: str | Path) -> None:
    """Scatter of widths and heights (area ~ count), kept buckets boxed in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    res = result.resolutions
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    if not res.empty:
        area = 10 + 290 * res["count"] / res["count"].max()
        colors = np.where(res["kept"], "tab:green", "tab:gray")
        ax.scatter(res["width"], res["height"], s=area, c=colors, alpha=0.6, edgecolors="none")
        for b in result.buckets.itertuples():
            pad = 2
            ax.add_patch(
                Rectangle(
                    (b.min_width - pad, b.min_height - pad),
                    b.max_width - b.min_width + 2 * pad,
                    b.max_height - b.min_height + 2 * pad,
                    fill=False,
                    edgecolor="tab:green" if b.kept else "tab:red",
                    linestyle="-" if b.kept else ":",
                )
            )
            ax.annotate(
                f"{b.bucket}\n{b.count}{'' if b.kept else ' (dropped)'}",
                (b.max_width, b.max_height),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image resolutions (marker area ~ count); kept buckets in green")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    plt.close(fig)


def sample_rows(table: pd.DataFrame, per_bucket: int) -> dict[str, list[int]]:
    """A deterministic sample of row positions from each kept bucket (smallest sha256 first)."""
    kept = table[table["kept"]].assign(_pos=lambda t: np.arange(len(t)))
    out = {}
    for name, members in kept.groupby("bucket", sort=True):
        out[str(name)] = list(members.sort_values("sha256").head(per_bucket)["_pos"])
    return out
