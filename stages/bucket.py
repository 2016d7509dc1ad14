"""bucket: group resolutions, keep the chosen buckets, resize them to one size."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


import pandas as pd

from photoprep.core import console, errors, io, params
from photoprep.core.chunked import ChunkedArray
from photoprep.core.layout import PATHS
from photoprep.images import bucket, sheets, stored
from photoprep.images.resize import PixelSpec


def main() -> str:
    p = params.load()
    valid = pd.read_parquet(PATHS.valid_table)
    broken = console.reasons(valid.loc[~valid["valid"], "reason"])
    cause = f"validate passed 0 of {console.count(len(valid))} images ({broken or 'none to check'})"
    console.require_input(int(valid["valid"].sum()), "bucket", cause, PATHS.broken_csv)
    result = bucket.assign_buckets(valid, p.bucket)
    del valid  # result.table holds the valid rows: one copy of the wide table, not two
    memory.release()  # each step's peak stands on its own, not on the garbage of the steps before
    counts = bucket.bucket_counts(result)
    samples = bucket.sample_rows(result.table, p.bucket.samples_per_bucket)
    images = len(result.table)
    io.write_table(result.resolutions, PATHS.resolutions_csv)
    bucket.plot_resolutions(result, PATHS.resolutions_png)
    kept = result.table[result.table["kept"]].reset_index(drop=True)
    del result  # all it served is taken: the wide table is held once, as `kept`
    memory.release()
    dropped = f"bucket.keep and bucket.min_count dropped every bucket ({console.count(images)} images)"
    console.require_input(len(kept), "bucket", dropped, PATHS.resolutions_csv)
    spec = PixelSpec.from_params(p)
    # Only what the pixels read (where each blob lies, its key, its source), not the wide table.
    located = kept[["source", "sha256", "shard", "offset", "size"]]
    stored.write_pixels(located, PATHS.raw_dir, spec, p.compute, PATHS.images_array, p.bucket.chunk_kb << 10)
    del located
    memory.release()
    pixels = ChunkedArray(PATHS.images_array)
    kept["row"] = range(len(kept))
    io.write_table(kept, PATHS.images_table)
    del kept
    memory.release()
    sheets.draw_bucket_samples(samples, pixels, PATHS.buckets_png)
    io.write_json(counts, PATHS.stage_counts("bucket"))
    return (
        f"{console.count(images)} valid images: {console.count(counts['kept'])} kept in "
        f"{len(counts['kept_per_bucket'])} buckets, {console.count(counts['bucket_dropped'])} dropped"
    )


if __name__ == "__main__":
    errors.run_stage(main)
