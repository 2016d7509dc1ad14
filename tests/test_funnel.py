"""The funnel: counts from every stage, summed over sources, in pipeline order."""

from photoprep.core import io
from photoprep.review import funnel as funnels


def test_funnel_sums_sources_and_keeps_pipeline_order(tmp_path):
    download = {
        "b": {
            "lines_read": 4,
            "unique_ids": 2,
            "fetched": 1,
            "fetch_failed": 1,
            "fetch_failed_by_reason": {"http_404": 1},
        },
        "a": {
            "lines_read": 6,
            "unique_ids": 3,
            "fetched": 3,
            "fetch_failed": 0,
            "fetch_failed_by_reason": {},
        },
    }
    stages = {"dedup": {"exact_duplicates": 1, "near_duplicates": 0}, "validate": {"valid": 3, "broken": 0}}
    funnel = funnels.funnel(download, stages)
    assert list(funnel)[:5] == [
        "lines_read",
        "unique_ids",
        "fetched",
        "fetch_failed",
        "fetch_failed_by_reason",
    ]
    assert funnel["lines_read"] == 10
    assert funnel["fetch_failed_by_reason"] == {"http_404": 1}
    assert list(funnel["per_source"]) == ["a", "b"]
    io.write_json(funnel, tmp_path / "funnel.json")
    assert io.read_json(tmp_path / "funnel.json") == funnel
