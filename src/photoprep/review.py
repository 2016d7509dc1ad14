"""Review: look at the clusters, then fix labels by moving files between folders.

* :func:`draw_cluster_sheets` draws one contact sheet per cluster (``cluster-XX.png``): the
  images nearest to its centre in the first row, the farthest in the second, each captioned
  with its label (``?`` when it has none) and its distance to the centre.
* :func:`write_cluster_index` writes an HTML page with every cluster's size, purity (the share
  of the majority label among its labelled members) and sheet, through relative links only;
  it loads nothing from elsewhere, so it opens from a file, an artifact store or a zip.
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
    (:func:`photoprep.split.attach_labels`): the member from the source listed last in ``sources``
    wins, so a review listed after the sources it reviews relabels their images.

File names are ``<source>__<id>-<hash>.<ext>`` (:func:`photoprep.export.file_name`, with the
extension of the image's format): only ``[A-Za-z0-9._-]``, unique per key, the same in every
export. ``mode="symlink"`` links to the source's own file instead of copying it when the source
reads local files (folder sources, relative paths, ``file://``) and the file still holds the
same bytes, with an absolute target; other images are copied. Copies are the choice for a
folder that will be committed or moved to another machine.
"""

from __future__ import annotations

import csv
import hashlib
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from photoprep import export, report, sheets
from photoprep.fetch import target_of
from photoprep.params import UserError
from photoprep.split import natural_sorted, read_labels
from photoprep.store import BlobReader

BY = ("cluster", "prediction")
MODES = ("copy", "symlink")
IMAGES_DIR = "images"
_EXTENSIONS = {
    "JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
    "TIFF": ".tif", "AVIF": ".avif", "HEIF": ".heic", "ICO": ".ico", "JPEG2000": ".jp2",
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


# --------------------------------------------------------------------------- sheets and index


def cluster_folder(cluster: int, n_clusters: int) -> str:
    """``cluster-07``: zero-padded to the width of the largest cluster number (at least 2)."""
    width = max(2, len(str(max(n_clusters - 1, 0))))
    return f"cluster-{int(cluster):0{width}d}"


def _caption(label: Any, distance: float) -> str:
    text = "?" if label is None or (isinstance(label, float) and np.isnan(label)) else str(label)
    return f"{text[:5]} {distance:.1f}"


def draw_cluster_sheets(
    table: pd.DataFrame,
    images: np.ndarray,
    labels: Sequence[Any],
    out_dir: str | Path,
    per_row: int = 8,
    n_clusters: int | None = None,
) -> dict[int, Path]:
    """One PNG per cluster in ``out_dir``: nearest images to the centre, then the farthest.

    ``table`` has ``cluster``, ``distance`` and ``row`` (index into ``images``, uint8
    N x H x W x 3, a memory map is fine); ``labels`` is aligned with ``table``. A cluster with
    fewer than ``2 * per_row`` members shows each of them once. Returns cluster -> sheet path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = int(n_clusters if n_clusters is not None else (table["cluster"].max() + 1 if len(table) else 0))
    frame = table[["cluster", "distance", "row"]].reset_index(drop=True).assign(label=list(labels))
    paths: dict[int, Path] = {}
    for c in range(k):
        members = frame[frame["cluster"] == c].sort_values(["distance", "row"], kind="mergesort")
        near = members.head(per_row)
        far = members.iloc[len(near):].sort_values(["distance", "row"], ascending=[False, True],
                                                   kind="mergesort").head(per_row)
        rows, titles = [], []
        for name, part in (("nearest", near), ("farthest", far)):
            if len(part):
                cells = [(np.asarray(images[int(r)]), _caption(lab, d))
                         for r, lab, d in zip(part["row"], part["label"], part["distance"])]
                rows.append(cells)
                titles.append(f"{name} ({len(part)})")
        path = out_dir / f"{cluster_folder(c, k)}.png"
        sheets.contact_sheet(rows, titles, path, title_width=96)
        paths[c] = path
    for stale in out_dir.glob("cluster-*.png"):  # sheets of clusters a previous run had
        if stale not in paths.values():
            stale.unlink()
    return paths


def _href(target: Path, page: Path) -> str:
    rel = os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)
    return quote(Path(rel).as_posix())


def write_cluster_index(
    summary: pd.DataFrame,
    sheet_paths: dict[int, Path],
    path: str | Path,
    metrics: dict[str, Any] | None = None,
) -> None:
    """``clusters.html``: a table of clusters (size, labelled, majority, purity) and each sheet.

    ``summary`` is :func:`photoprep.cluster.purity`'s table; links are relative to ``path``.
    """
    path = Path(path)
    k = len(summary)
    def esc(text: str) -> str:  # text between tags: quotes may stay as they are
        return html.escape(text, quote=False)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>photoprep clusters</title>',
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}"
        "td.l,th.l{text-align:left}section{margin-top:1.5em}img{image-rendering:pixelated;max-width:100%}"
        "</style></head><body>",
        "<h1>Clusters</h1>",
    ]
    total = int(summary["size"].sum()) if k else 0
    parts.append(f"<p>{total} images in {k} clusters. Purity: the share of the majority label among a "
                 "cluster's labelled members. Each sheet shows the images nearest to the cluster's centre, "
                 "then the farthest, captioned with label (? when unlabelled) and distance.</p>")
    methods = (metrics or {}).get("methods") or {}
    if any(methods.values()):
        parts.append("<h2>Agreement with the labels</h2><table><tr><th class=l>method</th>"
                     "<th>accuracy</th><th>NMI</th><th>ARI</th></tr>")
        for name, scores in methods.items():
            if scores:
                parts.append(f"<tr><td class=l>{esc(name)}</td><td>{scores['accuracy']:.3f}</td>"
                             f"<td>{scores['nmi']:.3f}</td><td>{scores['ari']:.3f}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Summary</h2><table><tr><th class=l>cluster</th><th>size</th><th>labelled</th>"
                 "<th class=l>majority</th><th>purity</th></tr>")
    for row in summary.itertuples(index=False):
        name = cluster_folder(row.cluster, k)
        majority = "" if row.majority is None or pd.isna(row.majority) else esc(str(row.majority))
        share = "" if row.purity is None or pd.isna(row.purity) else f"{row.purity:.3f}"
        parts.append(f'<tr><td class=l><a href="#{name}">{name}</a></td><td>{row.size}</td>'
                     f"<td>{row.labeled}</td><td class=l>{majority}</td><td>{share}</td></tr>")
    parts.append("</table>")
    for row in summary.itertuples(index=False):
        name = cluster_folder(row.cluster, k)
        majority = "none" if row.majority is None or pd.isna(row.majority) else esc(repr(str(row.majority)))
        share = "n/a" if row.purity is None or pd.isna(row.purity) else f"{row.purity:.3f}"
        parts.append(f'<section id="{name}"><h2>{name}</h2><p>size {row.size} · labelled {row.labeled} · '
                     f"majority {majority} · purity {share}</p>")
        sheet = sheet_paths.get(int(row.cluster))
        if sheet is not None:
            parts.append(f'<img src="{_href(sheet, path)}" alt="contact sheet of {name}">')
        parts.append("</section>")
    parts.append("</body></html>")
    report.write_text("\n".join(parts) + "\n", path)


# --------------------------------------------------------------------------- export


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


def file_name(source: str, id_: str, fmt: str) -> str:
    """``<source>__<id>-<hash>.<ext>``: :func:`photoprep.export.file_name` with the format's extension."""
    stem = export.file_name(str(source), str(id_)).removesuffix(".png")
    return stem + _EXTENSIONS.get(str(fmt).upper(), ".img")


def _groups(by: str, data_dir: Path) -> tuple[pd.DataFrame, dict[Any, str]]:
    """The table to export by (``source``, ``id``, ``group``, ``score``, ``distance``) and each group's folder."""
    if by == "cluster":
        path = data_dir / "clusters.parquet"
        if not path.exists():
            raise UserError(f"review: {path} not found (run the cluster stage first: dvc repro cluster)")
        table = pd.read_parquet(path)
        _require(table, ("source", "id", "cluster", "confidence", "distance"), path)
        k = int(table["cluster"].max()) + 1 if len(table) else 0
        out = pd.DataFrame({"source": table["source"].astype(str), "id": table["id"].astype(str),
                            "group": table["cluster"].astype("int64"), "score": table["confidence"].astype(float),
                            "distance": table["distance"].astype(float)})
        return out, {c: cluster_folder(c, k) for c in range(k)}
    path = data_dir / "predictions.parquet"
    if not path.exists():
        raise UserError(f"review: {path} not found (--by prediction needs a model's predictions of every image "
                        "with columns source, id, prediction, probability)")
    table = pd.read_parquet(path)
    _require(table, ("source", "id", "prediction", "probability"), path)
    predicted = table["prediction"].astype(str)
    out = pd.DataFrame({"source": table["source"].astype(str), "id": table["id"].astype(str),
                        "group": predicted, "score": table["probability"].astype(float), "distance": np.nan})
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
    data_dir: str | Path = "data",
    sources_dir: str | Path = "pipeline/sources",
    min_confidence: float | None = None,
    mode: str = "copy",
    splits: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ReviewExport:
    """Write the images grouped ``by`` cluster or predicted class as a folder source in ``out``.

    ``min_confidence`` keeps only images whose DEC confidence (``by="cluster"``) or predicted
    probability (``by="prediction"``) is at least that. ``splits`` keeps only the images of
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
    data_dir, sources_dir, out = Path(data_dir), Path(sources_dir), Path(out)
    groups, folders = _groups(by, data_dir)

    images_path = data_dir / "processed" / "images.parquet"
    if not images_path.exists():
        raise UserError(f"review: {images_path} not found (run dvc repro first)")
    columns = ["source", "id", "sha256", "shard", "offset", "size", "format", "url"]
    images = pd.read_parquet(images_path)
    _require(images, columns, images_path)
    table = groups.merge(images[columns].astype({"source": str, "id": str}), on=["source", "id"],
                         how="left", indicator=True)
    stale = int((table["_merge"] != "both").sum())
    if stale:
        raise UserError(f"review: {stale} images of the {by} table are not in {images_path} "
                        "(the two come from different runs: run dvc repro)")
    table = table.drop(columns="_merge").merge(read_labels(data_dir / "splits"), on=["source", "id"], how="left")

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
    table = table.sort_values(["folder", "distance", "score", "source", "id"],
                              ascending=[True, True, False, True, True], kind="mergesort").reset_index(drop=True)

    result = ReviewExport(out=out, skipped=skipped)
    with export.folder_in_place(out, overwrite, "review") as tmp:
        _write_folder(tmp, table, by, mode, data_dir / "raw", sources_dir, result)
    return result


def _write_folder(tmp: Path, table: pd.DataFrame, by: str, mode: str, raw_dir: Path, sources_dir: Path,
                  result: ReviewExport) -> None:
    readers: dict[str, BlobReader] = {}
    rows: list[list[Any]] = []
    try:
        for rec in table.itertuples(index=False):
            folder = tmp / IMAGES_DIR / rec.folder
            folder.mkdir(parents=True, exist_ok=True)
            name = file_name(rec.source, rec.id, rec.format)
            dest = folder / name
            original = _local_original(rec.url, sources_dir / rec.source, rec.sha256) if mode == "symlink" else None
            if original is not None:
                os.symlink(original, dest)
                result.linked += 1
            else:
                reader = readers.get(rec.source)
                if reader is None:
                    reader = readers[rec.source] = BlobReader(raw_dir / rec.source)
                data = reader.read(rec.shard, int(rec.offset), int(rec.size))
                if hashlib.sha256(data).hexdigest() != rec.sha256:
                    raise UserError(f"review: the stored bytes of ({rec.source!r}, {rec.id!r}) do not match their "
                                    f"sha256 (data/raw/{rec.source} changed since the run: run dvc repro)")
                dest.write_bytes(data)
                result.copied += 1
            result.folders[rec.folder] = result.folders.get(rec.folder, 0) + 1
            label = None if pd.isna(rec.label) else str(rec.label)
            rows.append([f"{IMAGES_DIR}/{rec.folder}/{name}", rec.source, rec.id, rec.sha256, rec.group,
                         round(float(rec.score), 6),
                         "" if pd.isna(rec.distance) else round(float(rec.distance), 6),
                         label or "", "" if pd.isna(rec.split) else rec.split])
    finally:
        for reader in readers.values():
            reader.close()
    (tmp / IMAGES_DIR).mkdir(exist_ok=True)
    with open(tmp / "review.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "source", "id", "sha256", by, "score", "distance", "label", "split"])
        writer.writerows(rows)
    hint = " (cluster-XX folders left as they are become classes named cluster-XX)" if by == "cluster" else ""
    (tmp / "source.yaml").write_text(SOURCE_YAML.format(by=f"--by {by}", rename_hint=hint), encoding="utf-8")
