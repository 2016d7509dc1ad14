"""download@<source>: read the source's manifest and fetch every id into the shard store."""

import sys

import pandas as pd

from photoprep import errors, io, params, report
from photoprep.ingest import fetch, manifest, sources
from photoprep.layout import PATHS


def main() -> None:
    name = sys.argv[1]
    p = params.load()
    source = sources.load_source(name)
    listed = manifest.read_manifest(source)
    table_path = PATHS.raw_table(name)
    previous = pd.read_parquet(table_path) if table_path.exists() else None
    table = fetch.fetch_all(
        listed.records,
        PATHS.shards_dir(name),
        p.download,
        base_dir=source.directory,
        previous=previous,
        allow_cross_host=source.allow_cross_host_redirects or None,
    )
    io.write_table(table, table_path)
    report.write_download_reports(name, listed, table, PATHS.download_reports(name))


if __name__ == "__main__":
    errors.run_stage(main)
