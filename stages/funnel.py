"""funnel: the count after each step, from every stage's counts, in reports/funnel.json."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep.core import errors, io, params
from photoprep.core.layout import PATHS
from photoprep.review import funnel


def main() -> str:
    p = params.load()
    download = {name: io.read_json(PATHS.download_reports(name) / "counts.json") for name in p.sources}
    stages = {name: io.read_json(PATHS.stage_counts(name)) for name in ("dedup", "validate", "bucket")}
    stages["split"] = {"split": io.read_json(PATHS.splits_report)["totals"]}
    counts = funnel.funnel(download, stages)
    io.write_json(counts, PATHS.funnel)
    steps = ("lines_read", "unique_ids", "fetched", "after_dedup", "valid", "kept")
    return " -> ".join(f"{step} {counts.get(step, 0):,}" for step in steps)


if __name__ == "__main__":
    errors.run_stage(main)
