"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

import pandas as pd

from photoprep import errors, io, params
from photoprep.images import featurize
from photoprep.layout import PATHS


def main() -> None:
    p = params.load()
    info = featurize.write_features(PATHS.images_array, PATHS.features_array, p.features, p.compute)
    table = pd.read_parquet(PATHS.images_table, columns=["source", "id", "row"])
    io.write_table(table, PATHS.features_table)
    io.write_json(info, PATHS.features_info)


if __name__ == "__main__":
    errors.run_stage(main)
