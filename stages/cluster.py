"""cluster: DEC on every kept image's features or CNN embeddings; metrics beside k-means baselines."""

from _interpreter import ensure_project_python

ensure_project_python()


from photoprep import portable
from photoprep.core import errors, params
from photoprep.core.chunked import ChunkedArray
from photoprep.core.layout import PATHS


def main() -> str:
    every = params.load()
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before numpy and torch load

    from photoprep.core import io
    from photoprep.learn import cluster, scores
    from photoprep.review import clusters as review_pages

    p = every.cluster
    inp = cluster.read_input(p, PATHS)
    labels = cluster.labels_for(inp.keys, PATHS.splits_dir)
    result = cluster.cluster_features(inp, labels, p)
    io.write_table(result.table, PATHS.clusters_table)
    cluster.save_dec(result, PATHS.dec_model)
    io.write_json(result.metrics, PATHS.cluster_metrics)
    io.write_json(result.perf, PATHS.cluster_perf)
    pretrain, refine = cluster.history_tables(result)
    io.write_table(pretrain, PATHS.cluster_pretrain_csv)
    io.write_table(refine, PATHS.cluster_refine_csv)
    images = ChunkedArray(PATHS.images_array)
    sheets = review_pages.draw_cluster_sheets(
        result.table, images, labels, PATHS.cluster_sheets_dir, p.sheet_images, p.n_clusters
    )
    purity = scores.purity(labels, result.table["cluster"])
    review_pages.write_cluster_index(purity, sheets, PATHS.clusters_html, result.metrics)
    return f"{result.metrics.get('n_images')} images ({p.input}) in {p.n_clusters} clusters"


if __name__ == "__main__":
    errors.run_stage(main)
