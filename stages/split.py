"""split: labels from each source, then stable stratified train/val/test (+ unlabeled)."""

import pandas as pd

from photoprep import params, report, sources, split


def main() -> None:
    p = params.load()
    table = pd.read_parquet("data/processed/images.parquet")
    labels = pd.concat([sources.load_labels(sources.load_source(name)) for name in p.sources])
    members = pd.read_parquet("data/interim/dedup.parquet", columns=["source", "id", "label", "group"])
    table = split.attach_labels(table, labels, members, priority=p.sources)
    result = split.assign_splits(table, p.split)
    for name in ("train", "val", "test", "unlabeled"):
        part = result.table[result.table["split"] == name].reset_index(drop=True)
        report.write_table(part, f"data/splits/{name}.parquet")
    report.write_json(split.split_report(result), "reports/splits.json")


if __name__ == "__main__":
    params.run_stage(main)
