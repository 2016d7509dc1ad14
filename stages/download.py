"""download@<source>: read the source's manifest and fetch every id into the shard store."""

import sys
from pathlib import Path

import pandas as pd

from photoprep import fetch, manifest, params, report, sources


def main() -> None:
    name = sys.argv[1]
    p = params.load()
    source = sources.load_source(name)
    listed = manifest.read_manifest(source)
    table_path = Path("data/raw") / f"{name}.parquet"
    previous = pd.read_parquet(table_path) if table_path.exists() else None
    table = fetch.fetch_all(
        listed.records,
        Path("data/raw") / name,
        p.download,
        base_dir=source.directory,
        previous=previous,
        allow_cross_host=source.allow_cross_host_redirects or None,
    )
    report.write_table(table, table_path)
    report.write_download_reports(name, listed, table, Path("reports/download") / name)


if __name__ == "__main__":
    params.run_stage(main)
