"""validate: the dataset's verdict on every image dedup left: the decode's reason (from dedup's
probe) or too_small."""

from _interpreter import ensure_project_python

ensure_project_python()


import pandas as pd

from photoprep.core import console, errors, io, params
from photoprep.core.layout import PATHS
from photoprep.images import validate


def main() -> str:
    p = params.load().validate
    checked = validate.validate_images(pd.read_parquet(PATHS.dedup_table), p)
    console.require_input(
        len(checked), "validate", "dedup left no fetched image", PATHS.stage_counts("dedup")
    )
    io.write_table(checked, PATHS.valid_table)
    io.write_table(validate.broken_report(checked), PATHS.broken_csv)
    counts = validate.validate_counts(checked)
    io.write_json(counts, PATHS.stage_counts("validate"))
    broken = console.reasons(checked.loc[~checked["valid"], "reason"])
    return (
        f"{console.count(len(checked))} images: {console.count(counts['valid'])} valid, "
        f"{console.count(counts['broken'])} broken" + (f" ({broken})" if broken else "")
    )


if __name__ == "__main__":
    errors.run_stage(main)
