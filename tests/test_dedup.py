"""Grouping: exact and near duplicates become groups with one deterministic representative."""

import pandas as pd

from photoprep.images import dedup
from photoprep.params import DedupParams

A = "f0f0f0f0f0f0f0f0"
A_NEAR = "f0f0f0f0f0f0f0f3"  # 2 bits from A
A_FAR = "f0f0f0f0f0f00f0f"  # 16 bits from A
B = "0123456789abcdef"


def _images(rows: list[tuple]) -> pd.DataFrame:
    """rows: (id, sha256, hash, width, height[, status, valid])."""
    out = []
    for row in rows:
        rid, sha, h, w, hh, *rest = row
        status, valid = rest if rest else ("ok", True)
        out.append(
            {
                "source": "s",
                "id": rid,
                "sha256": sha,
                "hash": h,
                "width": w,
                "height": hh,
                "status": status,
                "valid": valid,
            }
        )
    return pd.DataFrame(out)


def test_exact_copies_point_at_the_largest_then_smallest_key():
    images = _images([("b", "x", A, 64, 64), ("a", "x", A, 64, 64), ("c", "y", B, 64, 64)])
    table = dedup.find_duplicates(images, DedupParams()).table.set_index("id")
    assert table.loc["a", "dup_of"] == ""
    assert table.loc["b", "dup_of"] == "s/a"
    assert table.loc["b", "dup_reason"] == "exact"
    assert table.loc["c", "dup_of"] == ""


def test_near_copy_keeps_the_one_with_most_pixels():
    images = _images([("a", "x", A, 64, 64), ("z", "y", A_NEAR, 96, 96), ("f", "w", A_FAR, 96, 96)])
    result = dedup.find_duplicates(images, DedupParams(near_threshold=4))
    table = result.table.set_index("id")
    assert table.loc["a", "dup_of"] == "s/z"
    assert (table.loc["a", "dup_reason"], table.loc["a", "dup_distance"]) == ("near", 2)
    assert table.loc["f", "dup_of"] == ""
    assert result.counts == {"exact_duplicates": 0, "near_duplicates": 1, "after_dedup": 2}


def test_minus_one_turns_near_dedup_off_but_exact_stays():
    images = _images([("a", "x", A, 64, 64), ("b", "y", A_NEAR, 64, 64), ("c", "x", A, 64, 64)])
    counts = dedup.find_duplicates(images, DedupParams(near_threshold=-1)).counts
    assert counts == {"exact_duplicates": 1, "near_duplicates": 0, "after_dedup": 2}


def test_chains_join_one_group_and_broken_or_failed_rows_stay_out():
    images = _images(
        [
            ("a", "1", "0000000000000000", 64, 64),
            ("b", "2", "0000000000000007", 64, 64),  # 3 from a
            ("c", "3", "000000000000003f", 64, 64),  # 3 from b, 6 from a
            ("d", "4", "", 0, 0, "ok", False),  # broken: validate reports it
            ("e", "4", "", 0, 0, "ok", False),  # the same broken bytes: not a duplicate either
            ("f", None, None, None, None, "failed", None),
        ]
    )
    table = dedup.find_duplicates(images, DedupParams(near_threshold=3)).table.set_index("id")
    assert table.loc[["a", "b", "c"], "group"].nunique() == 1
    assert list(table.loc[["b", "c"], "dup_of"]) == ["s/a", "s/a"]
    assert table.loc["c", "dup_distance"] == 6
    assert list(table.loc[["d", "e", "f"], "dup_of"]) == ["", "", ""]
    assert list(table.loc[["d", "e", "f"], "group"]) == [-1, -1, -1]


def test_result_does_not_depend_on_input_order():
    rows = [(f"{i:03d}", f"sha{i % 7}", [A, A_NEAR, B, A_FAR][i % 4], 64 + i % 3, 64) for i in range(40)]
    one = dedup.find_duplicates(_images(rows), DedupParams()).table
    two = dedup.find_duplicates(_images(rows[::-1]), DedupParams()).table
    key = ["source", "id"]
    pd.testing.assert_frame_equal(
        one.sort_values(key).reset_index(drop=True), two.sort_values(key).reset_index(drop=True)
    )


def test_duplicates_report_has_one_row_per_group_member():
    images = _images(
        [("a", "x", A, 64, 64), ("b", "x", A, 64, 64), ("c", "y", A_NEAR, 32, 32), ("d", "z", B, 8, 8)]
    )
    table = dedup.find_duplicates(images, DedupParams()).table
    report = dedup.duplicate_groups(table)
    assert list(report["id"]) == ["a", "b", "c"]
    assert list(report["role"]) == ["kept", "exact", "near"]
    groups = dedup.near_groups_for_sheet(table, 5)
    assert len(groups) == 1 and list(groups[0]["id"]) == ["a", "b", "c"]
