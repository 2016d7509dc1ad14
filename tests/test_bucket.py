"""Resolution buckets: tolerance grouping, keep rules, counts and plots."""

import pandas as pd
import pytest

from photoprep.core.params import BucketKeep, BucketParams, BucketRange
from photoprep.images import bucket


def _valid(sizes: list[tuple[int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source": "s",
            "id": [f"{i:04d}" for i in range(len(sizes))],
            "sha256": [f"{i:064x}" for i in range(len(sizes))],
            "width": [w for w, _ in sizes],
            "height": [h for _, h in sizes],
            "valid": True,
        }
    )


SIZES = [(64, 64)] * 5 + [(96, 96)] * 3 + [(200, h) for h in range(120, 170, 5)] + [(640, 480)]


def test_sizes_within_tolerance_chain_into_one_bucket():
    result = bucket.assign_buckets(_valid(SIZES), BucketParams())
    assert dict(zip(result.buckets["bucket"], result.buckets["count"], strict=False)) == {
        "200x120..200x165": 10,
        "64x64": 5,
        "96x96": 3,
        "640x480": 1,
    }
    assert result.table["kept"].all()


def test_zero_tolerance_keeps_every_size_apart():
    result = bucket.assign_buckets(_valid(SIZES), BucketParams(tolerance_px=0))
    assert len(result.buckets) == 13


@pytest.mark.parametrize(
    ("keep", "min_count", "kept"),
    [
        (BucketKeep(top_k=1), 1, {"200x120..200x165"}),
        (BucketKeep(top_k=2), 1, {"200x120..200x165", "64x64"}),
        ("all", 4, {"200x120..200x165", "64x64"}),
        (BucketKeep(ranges=[BucketRange(width=(190, 210), height=(100, 170))]), 1, {"200x120..200x165"}),
        (BucketKeep(ranges=[BucketRange(width=(0, 100), height=(0, 100))], top_k=1), 1, {"64x64"}),
    ],
)
def test_keep_rules(keep, min_count, kept):
    result = bucket.assign_buckets(_valid(SIZES), BucketParams(keep=keep, min_count=min_count))
    assert set(result.buckets.loc[result.buckets["kept"], "bucket"]) == kept
    counts = bucket.bucket_counts(result)
    assert counts["kept"] + counts["bucket_dropped"] == len(SIZES)
    assert set(counts["kept_per_bucket"]) == kept


def test_invalid_images_are_not_bucketed_and_order_does_not_matter():
    table = _valid(SIZES)
    table.loc[0, "valid"] = False
    a = bucket.assign_buckets(table, BucketParams())
    b = bucket.assign_buckets(table.sample(frac=1, random_state=1), BucketParams())
    assert len(a.table) == len(SIZES) - 1
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.resolutions, b.resolutions)


def test_plot_and_samples(tmp_path):
    result = bucket.assign_buckets(_valid(SIZES), BucketParams(keep=BucketKeep(top_k=2)))
    bucket.plot_resolutions(result, tmp_path / "res.png")
    assert (tmp_path / "res.png").stat().st_size > 1000
    samples = bucket.sample_rows(result.table, 3)
    assert set(samples) == {"200x120..200x165", "64x64"}
    assert all(len(v) == 3 for v in samples.values())
