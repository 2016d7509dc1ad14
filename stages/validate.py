"""validate: the verdict on every remaining image (decoded once, in the dedup stage's probe)."""

import pandas as pd

from photoprep import params, report, validate


def main() -> None:
    p = params.load().validate
    checked = validate.validate_images(pd.read_parquet("data/interim/dedup.parquet"), p)
    report.write_table(checked, "data/interim/valid.parquet")
    report.write_table(validate.broken_report(checked), "reports/broken.csv")
    report.write_json(validate.validate_counts(checked), "reports/counts/validate.json")


if __name__ == "__main__":
    params.run_stage(main)
