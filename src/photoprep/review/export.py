"""The review export: fix labels by moving files between folders, then feed them back.

* :func:`export_review` writes one folder per cluster (or per predicted class) holding the
  images themselves, as a ready **folder source**::

      OUT/source.yaml                       format: folder, manifest: images
      OUT/images/<folder>/<file>            the original bytes of each image
      OUT/review.csv                        file, source, id, sha256, group, score, distance, label, split

  A person renames folders to class names, moves misplaced images to the right folder and
  deletes what this review should not label; then ``OUT`` is copied to
  ``pipeline/sources/<name>/`` and ``<name>`` added to ``sources`` in params.yaml. Each image
  then arrives a second time, labelled by its folder.

Why the original bytes
    The exported file is byte-identical to the image the pipeline already holds, so the dedup
    stage puts the two in one group (an exact duplicate, whatever ``dedup.near_threshold``
    says) and keeps one. A re-encoded or resized copy would be only a near duplicate, and one
    beyond the threshold would enter the dataset twice, possibly once in train and once in
    test. Whose label counts is the split stage's rule for a duplicate group
    (:func:`photoprep.dataset.split.attach_labels`): the member from the source listed last in ``sources``
    wins, so a review listed after the sources it reviews relabels their images.

File names are ``<source>__<id>-<hash>.<ext>`` (:func:`original_file_name`: the name of
:func:`photoprep.dataset.export.file_name` with the extension of the image's format): only
``[A-Za-z0-9._-]``, unique per key, the same in every export. ``mode="symlink"`` links to the
source's own file instead of copying it when the source reads local files (folder sources,
relative paths, ``file://``) and the file still holds the same bytes, with an absolute target;
other images are copied. Copies are the choice for a folder that will be committed or moved to
another machine.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from photoprep.core.errors import UserError
from photoprep.core.layout import PATHS, Layout
from photoprep.dataset import export
from photoprep.dataset.split import clean_label, natural_sorted, read_labels
from photoprep.ingest.blobs import BlobReader
from photoprep.ingest.targets import target_of
from photoprep.review.clusters import cluster_folder

BY = ("cluster", "prediction")
MODES = ("copy", "symlink")
IMAGES_DIR = "images"
REVIEW_CSV = "review.csv"  # every review export writes it; --overwrite replaces only such folders
_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "AVIF": ".avif",
    "HEIF": ".heic",
    "ICO": ".ico",
    "JPEG2000": ".jp2",
}
SOURCE_YAML = """\
# A review export of photoprep ({by}), ready to be used as a folder source.
#
# Each folder under images/ is a class: its name becomes the label of every image in it.
# 1. Rename each folder to the class it holds{rename_hint}.
# 2. Move misplaced images to the right folder (make new folders as needed); delete the images
#    this review should not label. review.csv says where each file came from.
# 3. Copy this folder to pipeline/sources/<name>/ and list <name> in `sources` in params.yaml,
#    after the sources it reviews: sources: [demo, <name>]. Then run dvc repro.
format: folder
manifest: images
"""


@dataclass
class ReviewExport:
    """What :func:`export_review` wrote: the folder, files per sub-folder, and how."""

    out: Path
    folders: dict[str, int] = field(default_factory=dict)
    copied: int = 0
    linked: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def files(self) -> int:
        return sum(self.folders.values())


def original_file_name(source: str, id_: str, fmt: str) -> str:
    """``<source>__<id>-<hash>.<ext>``: :func:`photoprep.dataset.export.file_name` with the
    format's extension."""
    stem = export.file_name(str(source), str(id_)).removesuffix(".png")
    return stem + _EXTENSIONS.get(str(fmt).upper(), ".img")


def _groups(by: str, paths: Layout) -> tuple[pd.DataFrame, dict[Any, str]]:
    """The table to export by (``source``, ``id``, ``group``, ``score``, ``distance``) and each
    group's folder."""
    if by == "cluster":
        path = paths.clusters_table
        if not path.exists():
            raise UserError(f"review: {path} not found (run the cluster stage first: dvc repro cluster)")
        table = pd.read_parquet(path)
        _require(table, ("source", "id", "cluster", "confidence", "distance"), path)
        k = int(table["cluster"].max()) + 1 if len(table) else 0
        out = pd.DataFrame(
            {
                "source": table["source"].astype(str),
                "id": table["id"].astype(str),
                "group": table["cluster"].astype("int64"),
                "score": table["confidence"].astype(float),
                "distance": table["distance"].astype(float),
            }
        )
        return out, {c: cluster_folder(c, k) for c in range(k)}
    path = paths.predictions_table
    if not path.exists():
        raise UserError(
            f"review: {path} not found (--by prediction needs a model's predictions of every image "
            "with columns source, id, prediction, probability)"
        )
    table = pd.read_parquet(path)
    _require(table, ("source", "id", "prediction", "probability"), path)
    predicted = table["prediction"].astype(str)
    out = pd.DataFrame(
        {
            "source": table["source"].astype(str),
            "id": table["id"].astype(str),
            "group": predicted,
            "score": table["probability"].astype(float),
            "distance": np.nan,
        }
    )
    return out, export.class_folders(natural_sorted(set(predicted)))


def _require(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"review: {path} lacks column(s) {missing} (has {list(table.columns)})")


def _local_original(url: Any, source_dir: Path, sha256: str) -> str | None:
    """The absolute path of the source's own file for ``url`` when it still holds ``sha256``'s bytes."""
    target = target_of(url, source_dir)
    if target.path is None or not os.path.isfile(target.path):
        return None
    digest = hashlib.sha256()
    with open(target.path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return os.path.abspath(target.path) if digest.hexdigest() == sha256 else None


def export_review(
    by: str,
    out: str | Path,
    *,
    paths: Layout = PATHS,
    min_confidence: float | None = None,
    mode: str = "copy",
    splits: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ReviewExport:
    """Write the images grouped ``by`` cluster or predicted class as a folder source in ``out``.

    ``min_confidence`` keeps only images whose DEC confidence (``by="cluster"``) or predicted
    probability (``by="prediction"``) is at least that. ``paths`` is the project's layout (its
    tables, splits, shards and source folders). ``splits`` keeps only the images of
    these splits (e.g. ``["unlabeled"]``). ``mode`` is ``copy`` or ``symlink`` (see the module
    notes). The folder is built beside ``out`` and renamed into place at the end; an existing
    non-empty ``out`` is a UserError unless ``overwrite``.
    """
    if by not in BY:
        raise UserError(f"review: --by must be one of {list(BY)} (got {by!r})")
    if mode not in MODES:
        raise UserError(f"review: mode must be one of {list(MODES)} (got {mode!r})")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise UserError(f"review: min_confidence must be between 0 and 1 (got {min_confidence})")
    out = Path(out)
    groups, folders = _groups(by, paths)

    images_path = paths.images_table
    if not images_path.exists():
        raise UserError(f"review: {images_path} not found (run dvc repro first)")
    columns = ["source", "id", "sha256", "shard", "offset", "size", "format", "url"]
    images = pd.read_parquet(images_path)
    _require(images, columns, images_path)
    table = groups.merge(
        images[columns].astype({"source": str, "id": str}), on=["source", "id"], how="left", indicator=True
    )
    stale = int((table["_merge"] != "both").sum())
    if stale:
        raise UserError(
            f"review: {stale} images of the {by} table are not in {images_path} "
            "(the two come from different runs: run dvc repro)"
        )
    table = table.drop(columns="_merge").merge(read_labels(paths.splits_dir), on=["source", "id"], how="left")

    skipped: dict[str, int] = {}
    if splits is not None:
        wanted = set(splits)
        keep = table["split"].isin(wanted)
        skipped["not_in_splits"] = int((~keep).sum())
        table = table[keep]
    if min_confidence is not None:
        keep = table["score"] >= min_confidence
        skipped["below_confidence"] = int((~keep).sum())
        table = table[keep]
    table = table.assign(folder=table["group"].map(folders))
    table = table.sort_values(
        ["folder", "distance", "score", "source", "id"],
        ascending=[True, True, False, True, True],
        kind="mergesort",
    ).reset_index(drop=True)

    result = ReviewExport(out=out, skipped=skipped)
    with export.folder_in_place(out, overwrite, "review", marker=REVIEW_CSV) as tmp:
        _write_folder(tmp, table, by, mode, paths, result)
    return result


def _write_folder(
    tmp: Path, table: pd.DataFrame, by: str, mode: str, paths: Layout, result: ReviewExport
) -> None:
    readers: dict[str, BlobReader] = {}
    rows: list[list[Any]] = []
    try:
        for rec in table.itertuples(index=False):
            folder = tmp / IMAGES_DIR / rec.folder
            folder.mkdir(parents=True, exist_ok=True)
            name = original_file_name(rec.source, rec.id, rec.format)
            dest = folder / name
            original = (
                _local_original(rec.url, paths.source_dir(rec.source), rec.sha256)
                if mode == "symlink"
                else None
            )
            if original is not None:
                os.symlink(original, dest)
                result.linked += 1
            else:
                reader = readers.get(rec.source)
                if reader is None:
                    reader = readers[rec.source] = BlobReader(paths.shards_dir(rec.source))
                data = reader.read(rec.shard, int(rec.offset), int(rec.size))
                if hashlib.sha256(data).hexdigest() != rec.sha256:
                    raise UserError(
                        f"review: the stored bytes of ({rec.source!r}, {rec.id!r}) do not match their "
                        f"sha256 ({paths.shards_dir(rec.source)} changed since the run: run dvc repro)"
                    )
                dest.write_bytes(data)
                result.copied += 1
            result.folders[rec.folder] = result.folders.get(rec.folder, 0) + 1
            label = clean_label(rec.label)
            rows.append(
                [
                    f"{IMAGES_DIR}/{rec.folder}/{name}",
                    rec.source,
                    rec.id,
                    rec.sha256,
                    rec.group,
                    round(float(rec.score), 6),
                    "" if pd.isna(rec.distance) else round(float(rec.distance), 6),
                    label or "",
                    "" if pd.isna(rec.split) else rec.split,
                ]
            )
    finally:
        for reader in readers.values():
            reader.close()
    (tmp / IMAGES_DIR).mkdir(exist_ok=True)
    with open(tmp / REVIEW_CSV, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "source", "id", "sha256", by, "score", "distance", "label", "split"])
        writer.writerows(rows)
    hint = " (cluster-XX folders left as they are become classes named cluster-XX)" if by == "cluster" else ""
    (tmp / "source.yaml").write_text(SOURCE_YAML.format(by=f"--by {by}", rename_hint=hint), encoding="utf-8")
