"""split: labels from each source, then stable stratified train/val/test (+ unlabeled), the images
table read a slice at a time within compute.memory_mb (photoprep.dataset.split_file)."""

from _interpreter import ensure_project_python

ensure_project_python()

from photoprep.core import memory

memory.arrow_from_malloc()  # before pyarrow loads: photoprep.core.memory says why


import pandas as pd

from photoprep.core import console, errors, io, params, tables
from photoprep.core.layout import PATHS, SPLITS
from photoprep.dataset import split_file
from photoprep.ingest import sources


def main() -> str:
    p = params.load()
    images = tables.row_count(PATHS.images_table)
    console.require_input(images, "split", "bucket kept no image", PATHS.stage_counts("bucket"))
    labels = pd.concat([sources.load_labels(sources.load_source(name)) for name in p.sources])
    # Only the members of groups of two or more can give a kept image another label (in dedup's
    # table, those with `dup_of` set name the kept copy), read a slice at a time.
    members = tables.rows_in_groups(
        PATHS.dedup_table, p.compute.memory_mb, "group", "dup_of", ["source", "id", "label", "group"]
    )
    # The images table is read a slice at a time (compute.memory_mb), once per pass.
    given = split_file.LabelSources(labels, members, p.sources)
    table = split_file.ImagesTable(PATHS.images_table, given, p.compute.memory_mb)
    labelled = table.count_labelled()
    cause = f"none of the {console.count(images)} images has a label (labels.csv ids or class folders)"
    see = f"{PATHS.download_reports_dir.as_posix()}/<source>/labels_unmatched.csv"
    console.require_input(labelled, "split", cause, see)
    report = table.write_splits(p.split, {name: PATHS.split_table(name) for name in SPLITS})
    io.write_json(report, PATHS.splits_report)
    totals = ", ".join(f"{name} {console.count(n)}" for name, n in report["totals"].items())
    return f"{console.count(images)} images, {len(report['classes'])} classes: {totals}"


if __name__ == "__main__":
    errors.run_stage(main)
