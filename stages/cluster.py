"""cluster: DEC on the feature vectors of every kept image; metrics beside two k-means baselines."""

from _interpreter import ensure_project_python

ensure_project_python()


import numpy as np
import pandas as pd

from photoprep import portable
from photoprep.core import errors, io, params
from photoprep.core.layout import PATHS
from photoprep.review import clusters as review_pages


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.portable, every.compute.threads)  # before torch loads
    from photoprep.learn import cluster

    p = every.cluster
    features = np.load(PATHS.features_array, mmap_mode="r")
    info = io.read_json(PATHS.features_info)
    keys = pd.read_parquet(PATHS.features_table, columns=["source", "id", "row"])
    labels = cluster.labels_for(keys, PATHS.splits_dir)
    result = cluster.cluster_features(features, info, keys, labels, p)
    io.write_table(result.table, PATHS.clusters_table)
    cluster.save_dec(result, PATHS.dec_model)
    io.write_json(result.metrics, PATHS.cluster_metrics)
    io.write_json(result.perf, PATHS.cluster_perf)
    pretrain, refine = cluster.history_tables(result)
    io.write_table(pretrain, PATHS.cluster_pretrain_csv)
    io.write_table(refine, PATHS.cluster_refine_csv)
    images = np.load(PATHS.images_array, mmap_mode="r")
    sheets = review_pages.draw_cluster_sheets(
        result.table, images, labels, PATHS.cluster_sheets_dir, p.sheet_images, p.n_clusters
    )
    purity = cluster.purity(labels, result.table["cluster"])
    review_pages.write_cluster_index(purity, sheets, PATHS.clusters_html, result.metrics)
    return f"{result.metrics.get('n_images')} images in {p.n_clusters} clusters"


if __name__ == "__main__":
    errors.run_stage(main)
