"""bucket: group resolutions, keep the chosen buckets, resize them to one size."""

import numpy as np
import pandas as pd

from photoprep import errors, io, params
from photoprep.images import bucket, probe, sheets
from photoprep.layout import PATHS


def main() -> None:
    p = params.load()
    result = bucket.assign_buckets(pd.read_parquet(PATHS.valid_table), p.bucket)
    kept = result.table[result.table["kept"]].reset_index(drop=True)
    probe.write_pixels(
        kept, PATHS.raw_dir, p.bucket.size, p.bucket.fit, p.validate.max_pixels, p.compute, PATHS.images_array
    )
    pixels = np.load(PATHS.images_array, mmap_mode="r")
    io.write_table(kept.assign(row=range(len(kept))), PATHS.images_table)
    io.write_table(result.resolutions, PATHS.resolutions_csv)
    bucket.plot_resolutions(result, PATHS.resolutions_png)
    samples = bucket.sample_rows(result.table, p.bucket.samples_per_bucket)
    sheets.draw_bucket_samples(samples, pixels, PATHS.buckets_png)
    io.write_json(bucket.bucket_counts(result), PATHS.stage_counts("bucket"))


if __name__ == "__main__":
    errors.run_stage(main)
