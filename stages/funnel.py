"""funnel: the count after each step, from every stage's counts, in reports/funnel.json."""

from pathlib import Path

from photoprep import params, report


def main() -> None:
    p = params.load()
    download = {name: report.read_json(Path("reports/download") / name / "counts.json") for name in p.sources}
    stages = {name: report.read_json(f"reports/counts/{name}.json") for name in ("dedup", "validate", "bucket")}
    stages["split"] = {"split": report.read_json("reports/splits.json")["totals"]}
    report.write_json(report.funnel(download, stages), "reports/funnel.json")


if __name__ == "__main__":
    params.run_stage(main)
