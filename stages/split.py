"""split: labels from each source, then stable stratified train/val/test (+ unlabeled)."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


import pandas as pd

from photoprep.core import console, errors, io, params, tables
from photoprep.core.layout import PATHS, SPLITS
from photoprep.dataset import split
from photoprep.ingest import sources


def main() -> str:
    p = params.load()
    # Only what labels and splits read: the images table carries every probe column besides.
    table = tables.read_columns(PATHS.images_table, split.READS)
    console.require_input(len(table), "split", "bucket kept no image", PATHS.stage_counts("bucket"))
    labels = pd.concat([sources.load_labels(sources.load_source(name)) for name in p.sources])
    # Only the members of groups of two or more can give a kept image another label (in dedup's
    # table, those with `dup_of` set name the kept copy), read a slice at a time.
    members = tables.rows_in_groups(
        PATHS.dedup_table, p.compute.memory_mb, "group", "dup_of", ["source", "id", "label", "group"]
    )
    table = split.attach_labels(table, labels, members, priority=p.sources)
    del labels, members  # held to the end, they were the stage's largest tables after the images'
    images = len(table)
    labelled = int((table["label"].notna() & (table["label"].astype(str) != "")).sum())
    cause = f"none of the {console.count(images)} images has a label (labels.csv ids or class folders)"
    see = f"{PATHS.download_reports_dir.as_posix()}/<source>/labels_unmatched.csv"
    console.require_input(labelled, "split", cause, see)
    result = split.assign_splits(table, p.split)
    del table  # the result holds what the splits need
    for name in SPLITS:
        part = result.table[result.table["split"] == name].reset_index(drop=True)
        io.write_table(part, PATHS.split_table(name))
    report = split.split_report(result)
    io.write_json(report, PATHS.splits_report)
    totals = ", ".join(f"{name} {console.count(n)}" for name, n in report["totals"].items())
    return f"{console.count(images)} images, {len(report['classes'])} classes: {totals}"


if __name__ == "__main__":
    errors.run_stage(main)
