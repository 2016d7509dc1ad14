"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

from _interpreter import ensure_project_python

ensure_project_python()


import pandas as pd

from photoprep.core import console, errors, io, params
from photoprep.core.layout import PATHS
from photoprep.images import features


def main() -> str:
    p = params.load()
    table = pd.read_parquet(PATHS.images_table, columns=["source", "id", "row"])
    console.require_input(len(table), "features", "bucket kept no image", PATHS.stage_counts("bucket"))
    info = features.write_features(PATHS.images_array, PATHS.features_array, p.features, p.compute)
    io.write_table(table, PATHS.features_table)
    io.write_json(info, PATHS.features_info)
    return f"{console.count(len(table))} images: {info['dim']} features each"


if __name__ == "__main__":
    errors.run_stage(main)
