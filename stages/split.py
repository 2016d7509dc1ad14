"""split: labels from each source, then stable stratified train/val/test (+ unlabeled)."""

import pandas as pd

from photoprep import errors, io, params
from photoprep.dataset import split
from photoprep.ingest import sources
from photoprep.layout import PATHS, SPLITS


def main() -> None:
    p = params.load()
    table = pd.read_parquet(PATHS.images_table)
    labels = pd.concat([sources.load_labels(sources.load_source(name)) for name in p.sources])
    members = pd.read_parquet(PATHS.dedup_table, columns=["source", "id", "label", "group"])
    table = split.attach_labels(table, labels, members, priority=p.sources)
    result = split.assign_splits(table, p.split)
    for name in SPLITS:
        part = result.table[result.table["split"] == name].reset_index(drop=True)
        io.write_table(part, PATHS.split_table(name))
    io.write_json(split.split_report(result), PATHS.splits_report)


if __name__ == "__main__":
    errors.run_stage(main)
