"""features: HOG of the grayscale image + a Cr/Cb colour map, for every processed image."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


from photoprep.core import console, errors, io, params, tables
from photoprep.core.layout import PATHS
from photoprep.images import features


def main() -> str:
    p = params.load()
    images = tables.row_count(PATHS.images_table)
    console.require_input(images, "features", "bucket kept no image", PATHS.stage_counts("bucket"))
    info = features.write_features(PATHS.images_array, PATHS.features_array, p.features, p.compute)
    # The ids are read once the features are written, a slice at a time (compute.memory_mb).
    with tables.TableWriter(PATHS.features_table) as out:
        for ids in tables.slices(PATHS.images_table, p.compute.memory_mb, ["source", "id", "row"]):
            out.write(ids)
    io.write_json(info, PATHS.features_info)
    return f"{console.count(images)} images: {info['dim']} features each"


if __name__ == "__main__":
    errors.run_stage(main)
