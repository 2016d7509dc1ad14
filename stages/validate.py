"""validate: the verdict on every remaining image (decoded once, in the dedup stage's probe)."""

import pandas as pd

from photoprep import errors, io, params
from photoprep.images import validate
from photoprep.layout import PATHS


def main() -> None:
    p = params.load().validate
    checked = validate.validate_images(pd.read_parquet(PATHS.dedup_table), p)
    io.write_table(checked, PATHS.valid_table)
    io.write_table(validate.broken_report(checked), PATHS.broken_csv)
    io.write_json(validate.validate_counts(checked), PATHS.stage_counts("validate"))


if __name__ == "__main__":
    errors.run_stage(main)
