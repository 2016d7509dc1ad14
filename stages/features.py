"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

import numpy as np
import pandas as pd

from photoprep import console, errors, io, params
from photoprep.images import features
from photoprep.layout import PATHS


def main() -> str:
    p = params.load()
    pixels = np.load(PATHS.images_array, mmap_mode="r")
    table = pd.read_parquet(PATHS.images_table, columns=["source", "id", "row"])
    console.require_input(len(table), "features", "bucket kept no image", PATHS.stage_counts("bucket"))
    matrix, info = features.compute_features(pixels, p.features, p.compute.n_jobs, p.compute.batch_size)
    io.write_array(matrix.astype(np.float32), PATHS.features_array)
    io.write_table(table, PATHS.features_table)
    io.write_json(info, PATHS.features_info)
    return f"{console.count(len(table))} images: {info['dim']} features each"


if __name__ == "__main__":
    errors.run_stage(main)
