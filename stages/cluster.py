"""cluster: DEC on the feature vectors of every kept image; metrics beside two k-means baselines."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep import cluster, params, report, review


def main() -> None:
    p = params.load().cluster
    features = np.load("data/features/features.npy", mmap_mode="r")
    info = json.loads(Path("data/features/features.json").read_text(encoding="utf-8"))
    keys = pd.read_parquet("data/features/features.parquet", columns=["source", "id", "row"])
    labels = cluster.labels_for(keys, "data/splits")
    result = cluster.cluster_features(features, info, keys, labels, p)
    report.write_table(result.table, "data/clusters.parquet")
    cluster.save_model(result, "models/dec.pt")
    report.write_json(result.metrics, "metrics/cluster.json")
    report.write_json(result.perf, "reports/cluster_perf.json")
    pretrain, refine = cluster.history_tables(result)
    report.write_table(pretrain, "plots/cluster_pretrain.csv")
    report.write_table(refine, "plots/cluster_refine.csv")
    images = np.load("data/processed/images.npy", mmap_mode="r")
    sheets = review.draw_cluster_sheets(result.table, images, labels, "reports/clusters", p.sheet_images, p.n_clusters)
    review.write_cluster_index(cluster.purity(labels, result.table["cluster"]), sheets, "reports/clusters.html",
                               result.metrics)


if __name__ == "__main__":
    params.run_stage(main)
