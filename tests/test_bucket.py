"""Resolution buckets: tolerance grouping, keep rules, counts and plots."""

import numpy as np
import pandas as pd
import pytest

from photoprep.core import io
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


def _many(n: int, seed: int = 0) -> pd.DataFrame:
    """n rows in (source, id) order, a few hundred sizes, some invalid, some sha256s repeated."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "source": np.where(np.arange(n) < n // 3, "a", "b"),
            "id": [f"{i:06d}" for i in range(n)],
            "sha256": [f"{v:064x}" for v in rng.integers(0, n // 2, n)],
            "width": rng.choice([64, 66, 96, 200, 205, 640, 1024], n) + rng.integers(0, 3, n),
            "height": rng.choice([64, 96, 120, 480], n),
            "valid": rng.random(n) > 0.1,
            "reason": "",
        }
    )
    return table


@pytest.mark.parametrize("params", [BucketParams(), BucketParams(keep=BucketKeep(top_k=3), min_count=50)])
def test_a_table_in_a_file_is_bucketed_as_in_memory_whatever_the_slices(tmp_path, params):
    table = _many(12000)
    io.write_table(table, tmp_path / "valid.parquet")
    whole = bucket.assign_buckets(table, params)
    kept = whole.table[whole.table["kept"]].reset_index(drop=True)
    kept["row"] = range(len(kept))
    io.write_table(kept, tmp_path / "expected.parquet")
    for memory_mb in (1, 256):  # slices of 1,024 rows, and one slice
        found = bucket.count_buckets(tmp_path / "valid.parquet", params, memory_mb)
        pd.testing.assert_frame_equal(found.resolutions, whole.resolutions)
        pd.testing.assert_frame_equal(found.buckets, whole.buckets)
        assert bucket.bucket_counts(found) == bucket.bucket_counts(whole)
        columns = bucket.kept_columns(tmp_path / "valid.parquet", found, ["sha256", "source"], memory_mb)
        pd.testing.assert_frame_equal(columns, kept[["sha256", "source"]])
        out = tmp_path / f"images-{memory_mb}.parquet"
        samples = bucket.write_kept(tmp_path / "valid.parquet", out, found, 4, memory_mb)
        assert out.read_bytes() == (tmp_path / "expected.parquet").read_bytes()
        assert samples == bucket.sample_rows(whole.table, 4)
        assert all(len(rows) == 4 for rows in samples.values())


def test_a_table_in_a_file_must_be_sorted_by_source_and_id(tmp_path):
    table = _many(3000)
    io.write_table(table.iloc[::-1], tmp_path / "valid.parquet")
    found = bucket.count_buckets(tmp_path / "valid.parquet", BucketParams(), 1)
    with pytest.raises(ValueError, match="not sorted by source and id"):
        bucket.write_kept(tmp_path / "valid.parquet", tmp_path / "out.parquet", found, 2, 1)
    assert not (tmp_path / "out.parquet").exists()


def _locations(table: pd.DataFrame) -> list[tuple[str, str, int, int]]:
    """The rows of `table` as (source, shard, offset, size), as the passes found them before
    `stored.Located`: a pandas lookup by sha256, then a tuple a row."""
    offsets, sizes = table["offset"].astype(int), table["size"].astype(int)
    return list(zip(table["source"], table["shard"], offsets, sizes, strict=True))


def test_the_pixels_locations_are_each_rows_made_a_group_at_a_time():
    """`stored.Located` (codes and numbers, not a tuple a row) gives what the table's rows say,
    for a group of row positions or a slice of groups, repeats and all."""
    from photoprep.images import stored

    table = pd.DataFrame(
        {
            "source": ["a", "a", "b", "b", "a"],
            "sha256": ["x", "y", "x", "z", "w"],
            "shard": ["s0", "s1", "s9", "s0", "s1"],
            "offset": [0, 10, 99, 20, 30],
            "size": [10, 5, 7, 3, 4],
        }
    )
    groups = [np.array([0, 1]), np.array([3, 2, 4]), np.array([4, 4])]
    located = stored.Located(table).of_rows(groups)
    assert len(located) == 3
    for group, got in zip(groups, located, strict=True):
        assert got == _locations(table.iloc[group])
        assert all(type(offset) is int and type(size) is int for _, _, offset, size in got)
    assert list(located[1:]) == [located[1], located[2]]
    assert located[1] == [("b", "s0", 20, 3), ("b", "s9", 99, 7), ("a", "s1", 30, 4)]
