"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


import pandas as pd

from photoprep.core import console, errors, io, params, tables
from photoprep.core.layout import PATHS
from photoprep.images import features


def main() -> str:
    p = params.load()
    images = tables.row_count(PATHS.images_table)
    console.require_input(images, "features", "bucket kept no image", PATHS.stage_counts("bucket"))
    info = features.write_features(PATHS.images_array, PATHS.features_array, p.features, p.compute)
    # The ids are read once the features are written: they are not held while those are computed.
    io.write_table(pd.read_parquet(PATHS.images_table, columns=["source", "id", "row"]), PATHS.features_table)
    io.write_json(info, PATHS.features_info)
    return f"{console.count(images)} images: {info['dim']} features each"


if __name__ == "__main__":
    errors.run_stage(main)
