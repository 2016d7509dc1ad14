"""bucket: group resolutions, keep the chosen buckets, resize them to one size."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why
memory.map_large_blocks(128 << 10)  # the decoded frames and pixel batches: photoprep.core.memory


from photoprep.core import console, errors, io, params, tables
from photoprep.core.chunked import ChunkedArray
from photoprep.core.layout import PATHS
from photoprep.images import bucket, sheets, stored
from photoprep.images.resize import PixelSpec


def main() -> str:
    p = params.load()
    # Two passes over the valid table, a slice at a time (compute.memory_mb): the sizes counted,
    # then each slice's kept rows written. The wide table is never held whole.
    found = bucket.count_buckets(PATHS.valid_table, p.bucket, p.compute.memory_mb)
    counts = bucket.bucket_counts(found)
    valid = counts["kept"] + counts["bucket_dropped"]
    if not valid:  # every row is broken: their reasons say why
        broken = console.reasons(tables.read_columns(PATHS.valid_table, ["reason"])["reason"])
        cause = f"validate passed 0 of {console.count(found.images)} images ({broken or 'none to check'})"
        console.require_input(0, "bucket", cause, PATHS.broken_csv)
    io.write_table(found.resolutions, PATHS.resolutions_csv)
    bucket.plot_resolutions(found, PATHS.resolutions_png)
    dropped = f"bucket.keep and bucket.min_count dropped every bucket ({console.count(valid)} images)"
    console.require_input(counts["kept"], "bucket", dropped, PATHS.resolutions_csv)
    spec = PixelSpec.from_params(p)
    # Only what the pixels read (where each blob lies, its key, its source), not the wide table.
    located = bucket.kept_columns(PATHS.valid_table, found, stored.LOCATES, p.compute.memory_mb)
    stored.write_pixels(located, PATHS.raw_dir, spec, p.compute, PATHS.images_array, p.bucket.chunk_kb << 10)
    del located
    memory.release()
    samples = bucket.write_kept(
        PATHS.valid_table, PATHS.images_table, found, p.bucket.samples_per_bucket, p.compute.memory_mb
    )
    sheets.draw_bucket_samples(samples, ChunkedArray(PATHS.images_array), PATHS.buckets_png)
    io.write_json(counts, PATHS.stage_counts("bucket"))
    return (
        f"{console.count(valid)} valid images: {console.count(counts['kept'])} kept in "
        f"{len(counts['kept_per_bucket'])} buckets, {console.count(counts['bucket_dropped'])} dropped"
    )


if __name__ == "__main__":
    errors.run_stage(main)
