"""bucket: group resolutions, keep the chosen buckets, resize them to one size."""

from pathlib import Path

import pandas as pd

from photoprep import bucket, images, params, report, sheets


def main() -> None:
    p = params.load()
    result = bucket.assign_buckets(pd.read_parquet("data/interim/valid.parquet"), p.bucket)
    kept = result.table[result.table["kept"]].reset_index(drop=True)
    pixels = images.resized_pixels(
        kept, Path("data/raw"), p.bucket.size, p.bucket.fit, p.validate.max_pixels, p.compute
    )
    images.write_array(pixels, "data/processed/images.npy")
    report.write_table(kept.assign(row=range(len(kept))), "data/processed/images.parquet")
    report.write_table(result.resolutions, "plots/resolutions.csv")
    bucket.plot_resolutions(result, "plots/resolutions.png")
    samples = bucket.sample_rows(result.table, p.bucket.samples_per_bucket)
    sheets.draw_bucket_samples(samples, pixels, "reports/buckets.png")
    report.write_json(bucket.bucket_counts(result), "reports/counts/bucket.json")


if __name__ == "__main__":
    params.run_stage(main)
