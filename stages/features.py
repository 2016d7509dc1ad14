"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

import numpy as np
import pandas as pd

from photoprep import features, images, params, report


def main() -> None:
    p = params.load()
    pixels = np.load("data/processed/images.npy", mmap_mode="r")
    table = pd.read_parquet("data/processed/images.parquet", columns=["source", "id", "row"])
    matrix, info = features.compute_features(pixels, p.features, p.compute.n_jobs, p.compute.batch_size)
    images.write_array(matrix.astype(np.float32), "data/features/features.npy")
    report.write_table(table, "data/features/features.parquet")
    report.write_json(info, "data/features/features.json")


if __name__ == "__main__":
    params.run_stage(main)
