"""funnel: the count after each step, from every stage's counts, in reports/funnel.json."""

from photoprep import errors, io, params, report
from photoprep.layout import PATHS


def main() -> None:
    p = params.load()
    download = {name: io.read_json(PATHS.download_reports(name) / "counts.json") for name in p.sources}
    stages = {name: io.read_json(PATHS.stage_counts(name)) for name in ("dedup", "validate", "bucket")}
    stages["split"] = {"split": io.read_json(PATHS.splits_report)["totals"]}
    io.write_json(report.funnel(download, stages), PATHS.funnel)


if __name__ == "__main__":
    errors.run_stage(main)
