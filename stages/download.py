"""download@<source>: read the source's manifest and fetch every id into the shard store."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep import portable
from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why
portable.blas_without_threads()  # before numpy loads: the download does no matrix maths


import sys

import pandas as pd

from photoprep.core import errors, params
from photoprep.core.layout import PATHS
from photoprep.ingest import fetch, manifest, partitions, reports, sources, targets


def main() -> str:
    name = sys.argv[1]
    stage = f"download@{name}"
    p = params.load()
    source = sources.load_source(name)
    listed = manifest.read_manifest(source)
    labels = sources.load_labels(source)  # read first: a bad labels file stops the stage before any request
    memory.release()  # the parses' temporaries: the fetch's peak stands on the records alone
    if targets.reads_files(listed.records["url"]):
        memory.map_large_blocks()  # each body from a file mapped on its own: photoprep.core.memory says why
    table_path = PATHS.raw_table(name)
    previous = pd.read_parquet(table_path) if table_path.exists() else None
    place = fetch.Place(PATHS.shards_dir(name), source.directory, table_path)
    settings = source.download_params(p.download)
    result = partitions.download(listed.records, place, settings, p.compute, previous)
    for line in result.problems(stage):
        print(line, file=sys.stderr, flush=True)
    if result.interrupted:
        raise errors.Interrupted(result.interrupted_line(stage))
    folder = PATHS.download_reports(name)
    reports.write_download_reports(name, listed, result.table, folder, labels)
    result.check_fetched(stage, folder / "failed.csv")
    return result.summary()


if __name__ == "__main__":
    errors.run_stage(main)
