"""Every path of the pipeline, named once.

Stage scripts take their paths from here, library functions from their arguments (a
:class:`Layout`, or a path a stage got from here), and ``dvc.yaml`` lists the same paths
(``tests/test_layout.py`` checks that the two agree). Paths are relative to the project root,
the folder that holds ``dvc.yaml``; ``Layout(root)`` places the same tree elsewhere (tests,
``photoprep verify`` on another checkout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CACHE_ENV", "DEFAULT_CACHE", "PATHS", "SPLITS", "Layout", "cache_root"]

SPLITS = ("train", "val", "test", "unlabeled")
# The decode memos (photoprep.images.memo): outside every pipeline output, wherever the user puts them.
CACHE_ENV = "PHOTOPREP_CACHE"
DEFAULT_CACHE = Path(".photoprep") / "cache"


def cache_root() -> Path:
    """Where memos live: $PHOTOPREP_CACHE, else .photoprep/cache under the working directory."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@dataclass(frozen=True)
class Layout:
    """The pipeline's files under ``root``. Attributes are paths; methods take a name."""

    root: Path = Path(".")

    # ---------------------------------------------------------------- inputs
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def sources_dir(self) -> Path:
        return self.root / "pipeline" / "sources"

    def source_dir(self, source: str) -> Path:
        return self.sources_dir / source

    @property
    def local_weights_dir(self) -> Path:
        """Where ``train.pretrained`` may name a local weights file (a dependency of ``pretrained``)."""
        return self.root / "pipeline" / "pretrained"

    # ---------------------------------------------------------------- download@<source>
    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    def raw_table(self, source: str) -> Path:
        return self.raw_dir / f"{source}.parquet"

    def shards_dir(self, source: str) -> Path:
        return self.raw_dir / source

    @property
    def download_reports_dir(self) -> Path:
        return self.root / "reports" / "download"

    def download_reports(self, source: str) -> Path:
        return self.download_reports_dir / source

    # ---------------------------------------------------------------- dedup, validate, bucket
    @property
    def dedup_table(self) -> Path:
        return self.root / "data" / "interim" / "dedup.parquet"

    @property
    def dedup_input(self) -> Path:
        """What dedup's table steps read (every record with its probe): the stage's scratch, gone
        when it ends."""
        return self.root / "data" / "interim" / ".dedup-input.parquet"

    @property
    def duplicates_csv(self) -> Path:
        return self.root / "reports" / "duplicates.csv"

    @property
    def duplicates_png(self) -> Path:
        return self.root / "reports" / "duplicates.png"

    @property
    def counts_dir(self) -> Path:
        return self.root / "reports" / "counts"

    def stage_counts(self, stage: str) -> Path:
        return self.counts_dir / f"{stage}.json"

    @property
    def valid_table(self) -> Path:
        return self.root / "data" / "interim" / "valid.parquet"

    @property
    def broken_csv(self) -> Path:
        return self.root / "reports" / "broken.csv"

    @property
    def images_array(self) -> Path:
        return self.root / "data" / "processed" / "images"  # a chunked array (photoprep.core.chunked)

    @property
    def images_table(self) -> Path:
        return self.root / "data" / "processed" / "images.parquet"

    @property
    def resolutions_csv(self) -> Path:
        return self.root / "plots" / "resolutions.csv"

    @property
    def resolutions_png(self) -> Path:
        return self.root / "plots" / "resolutions.png"

    @property
    def buckets_png(self) -> Path:
        return self.root / "reports" / "buckets.png"

    # ---------------------------------------------------------------- features, split, funnel
    @property
    def features_array(self) -> Path:
        return self.root / "data" / "features" / "features"  # a chunked array

    @property
    def features_table(self) -> Path:
        return self.root / "data" / "features" / "features.parquet"

    @property
    def features_info(self) -> Path:
        return self.root / "data" / "features" / "features.json"

    @property
    def splits_dir(self) -> Path:
        return self.root / "data" / "splits"

    def split_table(self, split: str) -> Path:
        return self.splits_dir / f"{split}.parquet"

    @property
    def splits_report(self) -> Path:
        return self.root / "reports" / "splits.json"

    @property
    def funnel(self) -> Path:
        return self.root / "reports" / "funnel.json"

    # ---------------------------------------------------------------- pretrained, train, evaluate, predict
    @property
    def pretrained_dir(self) -> Path:
        return self.root / "models" / "pretrained"

    @property
    def pretrained_weights(self) -> Path:
        """The fetched weights, always safetensors (a .pth is read with weights_only and converted)."""
        return self.pretrained_dir / "weights.safetensors"

    @property
    def pretrained_info(self) -> Path:
        """Where the weights came from, their hash and the backbone's data config."""
        return self.pretrained_dir / "pretrained.json"

    @property
    def model(self) -> Path:
        return self.root / "models" / "model.pt"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def live_dir(self) -> Path:
        return self.root / "dvclive"

    @property
    def train_perf(self) -> Path:
        return self.root / "reports" / "train_perf.json"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "metrics" / "eval.json"

    @property
    def perf_metrics(self) -> Path:
        return self.root / "metrics" / "perf.json"

    @property
    def confusion_csv(self) -> Path:
        return self.root / "plots" / "confusion.csv"

    @property
    def predictions_png(self) -> Path:
        return self.root / "reports" / "predictions.png"

    @property
    def misclassified_png(self) -> Path:
        return self.root / "reports" / "misclassified.png"

    @property
    def predictions_table(self) -> Path:
        return self.root / "data" / "predictions.parquet"

    @property
    def predict_metrics(self) -> Path:
        return self.root / "metrics" / "predict.json"

    @property
    def confidence_csv(self) -> Path:
        return self.root / "plots" / "confidence.csv"

    @property
    def predicted_png(self) -> Path:
        return self.root / "reports" / "predicted.png"

    # ---------------------------------------------------------------- introspect
    @property
    def tsne_csv(self) -> Path:
        return self.root / "plots" / "tsne.csv"

    @property
    def tsne_png(self) -> Path:
        return self.root / "reports" / "tsne.png"

    @property
    def filters_png(self) -> Path:
        return self.root / "reports" / "filters.png"

    @property
    def top5_png(self) -> Path:
        return self.root / "reports" / "top5.png"

    @property
    def top5_csv(self) -> Path:
        return self.root / "reports" / "top5.csv"

    # ---------------------------------------------------------------- embed, cluster
    @property
    def embeddings_dir(self) -> Path:
        return self.root / "data" / "embeddings"

    @property
    def embeddings_array(self) -> Path:
        return self.embeddings_dir / "embeddings.npy"

    @property
    def embeddings_table(self) -> Path:
        return self.embeddings_dir / "embeddings.parquet"

    @property
    def embeddings_info(self) -> Path:
        return self.embeddings_dir / "embeddings.json"

    @property
    def clusters_table(self) -> Path:
        return self.root / "data" / "clusters.parquet"

    @property
    def dec_model(self) -> Path:
        return self.root / "models" / "dec.pt"

    @property
    def cluster_metrics(self) -> Path:
        return self.root / "metrics" / "cluster.json"

    @property
    def cluster_perf(self) -> Path:
        return self.root / "reports" / "cluster_perf.json"

    @property
    def cluster_pretrain_csv(self) -> Path:
        return self.root / "plots" / "cluster_pretrain.csv"

    @property
    def cluster_refine_csv(self) -> Path:
        return self.root / "plots" / "cluster_refine.csv"

    @property
    def cluster_sheets_dir(self) -> Path:
        return self.root / "reports" / "clusters"

    @property
    def clusters_html(self) -> Path:
        return self.root / "reports" / "clusters.html"

    # ---------------------------------------------------------------- report
    @property
    def report_page(self) -> Path:
        return self.root / "reports" / "index.html"

    @property
    def report_charts_dir(self) -> Path:
        return self.root / "reports" / "page"


PATHS = Layout()
