"""Resolution buckets: group near-equal sizes, choose which buckets to keep, one output size.

Sizes within `tolerance_px` of each other, in both width and height, join one bucket (single
linkage, so 200x120 ... 200x165 in 5 px steps becomes one bucket, as the original grouping by
eye did). The kept images are resized to `size` by `fit`.

The buckets depend only on how many valid images have each size, so a table in a file is
bucketed in two passes of slices (`photoprep.core.tables`), each within ``compute.memory_mb``:
`count_buckets` counts the sizes, `write_kept` marks each slice's rows and writes the kept ones.
The table is never held whole; what is held is one row per distinct size and the bucket samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core import memory, tables
from photoprep.core.io import write_with
from photoprep.core.params import BucketKeep, BucketParams
from photoprep.images import graph


@dataclass
class Buckets:
    resolutions: pd.DataFrame  # width, height, count, bucket, kept: one row per distinct size
    buckets: pd.DataFrame  # bucket, min/max width and height, count, kept
    images: int  # the rows counted, valid or not


@dataclass
class BucketResult(Buckets):
    table: pd.DataFrame  # every valid image with its bucket and whether it is kept


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


def count_sizes(frame: pd.DataFrame) -> pd.DataFrame:
    """width, height and count of the valid rows of `frame` (one row per distinct size)."""
    sizes = frame.loc[frame["valid"].astype(bool), ["width", "height"]].astype(np.int64)
    return sizes.value_counts().rename("count").reset_index()


def bucket_sizes(counts: Iterable[pd.DataFrame], p: BucketParams, images: int) -> Buckets:
    """The buckets of the sizes counted in `counts` (`count_sizes` of each slice), and which
    of them `p.keep` selects."""
    parts = [c for c in counts if len(c)]
    if not parts:
        resolutions = pd.DataFrame({c: pd.Series(dtype=np.int64) for c in ("width", "height", "count")})
        empty = pd.DataFrame(
            columns=["bucket", "min_width", "min_height", "max_width", "max_height", "count", "kept"]
        )
        return Buckets(resolutions.assign(bucket="", kept=False), empty, images)
    resolutions = pd.concat(parts).groupby(["width", "height"], as_index=False, sort=True)["count"].sum()
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
    buckets = buckets.sort_values(["count", "bucket"], ascending=[False, True], kind="stable").reset_index(
        drop=True
    )
    return Buckets(resolutions, buckets, images)


def with_buckets(images: pd.DataFrame, resolutions: pd.DataFrame) -> pd.DataFrame:
    """`images` (valid rows) with the bucket of each one's size and whether it is kept."""
    if images.empty:
        return images.assign(bucket="", kept=False)
    lookup = resolutions.set_index(["width", "height"])
    keys = pd.MultiIndex.from_frame(images[["width", "height"]].astype(np.int64))
    return images.assign(
        bucket=lookup.loc[keys, "bucket"].to_numpy(), kept=lookup.loc[keys, "kept"].to_numpy()
    )


def assign_buckets(valid: pd.DataFrame, p: BucketParams) -> BucketResult:
    """Bucket every valid image of a table in memory by resolution and mark the buckets that
    `p.keep` selects."""
    images = valid[valid["valid"]].sort_values(["source", "id"], kind="stable").reset_index(drop=True)
    found = bucket_sizes([count_sizes(images)], p, len(valid))
    return BucketResult(
        found.resolutions, found.buckets, found.images, with_buckets(images, found.resolutions)
    )


def count_buckets(path: str | Path, p: BucketParams, memory_mb: int) -> Buckets:
    """The buckets of the Parquet table at `path`, its sizes counted a slice at a time."""
    counts, images = [], 0
    for frame in tables.slices(path, memory_mb, ["valid", "width", "height"]):
        counts.append(count_sizes(frame))
        images += len(frame)
    return bucket_sizes(counts, p, images)


def kept_columns(path: str | Path, found: Buckets, columns: list[str], memory_mb: int) -> pd.DataFrame:
    """The `columns` of the rows of the table at `path` that `found` keeps, in order."""
    reads = list(dict.fromkeys([*columns, "valid", "width", "height"]))
    parts = []
    for frame in tables.slices(path, memory_mb, reads):
        images = frame[frame["valid"]].reset_index(drop=True)
        parts.append(with_buckets(images, found.resolutions).loc[lambda t: t["kept"], columns])
        del frame, images
        memory.release()  # each slice's copies: freed, but the heap keeps their pages until told
    kept = pd.concat(parts, ignore_index=True)
    del parts
    memory.release()
    return kept


def write_kept(path: str | Path, out: str | Path, found: Buckets, per_bucket: int, memory_mb: int) -> dict:
    """Write the rows of the table at `path` (sorted by source and id, as validate writes it)
    that `found` keeps to `out`, numbered by `row`, a slice at a time; the samples of each kept
    bucket (`sample_rows`). The same bytes as `assign_buckets` of the whole table."""
    samples = Samples(per_bucket)
    order = tables.KeyOrder(path)  # repeated keys pass, as in memory
    with tables.TableWriter(out) as writer:
        for frame in tables.slices(path, memory_mb):
            images = frame[frame["valid"]].reset_index(drop=True)
            del frame
            order.check(images)
            kept = with_buckets(images, found.resolutions)
            kept = kept[kept["kept"]].reset_index(drop=True)
            kept["row"] = np.arange(samples.rows, samples.rows + len(kept), dtype=np.int64)
            samples.add(kept)
            writer.write(kept)
            del images, kept
            memory.release()  # the slice's pages back to the OS: the next slice takes their place
    return samples.chosen()


class Samples:
    """The `per_bucket` kept rows of smallest sha256 (then row) in each bucket, over slices."""

    def __init__(self, per_bucket: int) -> None:
        self.per_bucket = per_bucket
        self.best: pd.DataFrame | None = None
        self.rows = 0

    def add(self, kept: pd.DataFrame) -> None:
        """Rows of a slice (kept ones, with `row`), in table order."""
        rows = kept[["bucket", "sha256", "row"]]
        both = rows if self.best is None else pd.concat([self.best, rows], ignore_index=True)
        both = both.sort_values(["bucket", "sha256", "row"], kind="stable")
        self.best = both.groupby("bucket", sort=False).head(self.per_bucket).reset_index(drop=True)
        self.rows += len(kept)

    def chosen(self) -> dict[str, list[int]]:
        """Each kept bucket's sample (bucket names in order), as rows of the kept table."""
        if self.best is None:
            return {}
        return {
            str(name): [int(r) for r in part["row"]] for name, part in self.best.groupby("bucket", sort=True)
        }


def bucket_counts(found: Buckets) -> dict:
    """Funnel counts: images dropped for their bucket, kept, kept per bucket."""
    res = found.resolutions
    kept = res[res["kept"].astype(bool)]
    per_bucket = kept.groupby("bucket", sort=True)["count"].sum()
    return {
        "bucket_dropped": int(res.loc[~res["kept"].astype(bool), "count"].sum()),
        "kept": int(kept["count"].sum()),
        "kept_per_bucket": {str(k): int(v) for k, v in per_bucket.items()},
    }


def plot_resolutions(result: Buckets, path: str | Path) -> None:
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
    """A deterministic sample of row positions from each kept bucket (smallest sha256 first, then
    position)."""
    kept = table[table["kept"]]
    samples = Samples(per_bucket)
    samples.add(kept.assign(row=np.arange(len(kept), dtype=np.int64)))
    return samples.chosen()
