"""The cluster review pages: a contact sheet per cluster and an HTML index of them.

* :func:`draw_cluster_sheets` draws one contact sheet per cluster (``cluster-XX.png``): the
  images nearest to its centre in the first row, the farthest in the second, each captioned
  with its label (``?`` when it has none) and its distance to the centre.
* :func:`write_cluster_index` writes an HTML page with every cluster's size, purity (the share
  of the majority label among its labelled members) and sheet, through relative links only;
  it loads nothing from elsewhere, so it opens from a file, an artifact store or a zip.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from photoprep.core import io
from photoprep.dataset.split import clean_label
from photoprep.images import sheets


def cluster_folder(cluster: int, n_clusters: int) -> str:
    """``cluster-07``: zero-padded to the width of the largest cluster number (at least 2)."""
    width = max(2, len(str(max(n_clusters - 1, 0))))
    return f"cluster-{int(cluster):0{width}d}"


def _caption(label: Any, distance: float) -> str:
    text = clean_label(label) or "?"
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
        far = (
            members.iloc[len(near) :]
            .sort_values(["distance", "row"], ascending=[False, True], kind="mergesort")
            .head(per_row)
        )
        rows, titles = [], []
        for name, part in (("nearest", near), ("farthest", far)):
            if len(part):
                cells = [
                    (np.asarray(images[int(r)]), _caption(lab, d))
                    for r, lab, d in zip(part["row"], part["label"], part["distance"], strict=True)
                ]
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

    ``summary`` is :func:`photoprep.learn.scores.purity`'s table; links are relative to ``path``.
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
    parts.append(
        f"<p>{total} images in {k} clusters. Purity: the share of the majority label among a "
        "cluster's labelled members. Each sheet shows the images nearest to the cluster's centre, "
        "then the farthest, captioned with label (? when unlabelled) and distance.</p>"
    )
    methods = (metrics or {}).get("methods") or {}
    if any(methods.values()):
        parts.append(
            "<h2>Agreement with the labels</h2><table><tr><th class=l>method</th>"
            "<th>accuracy</th><th>NMI</th><th>ARI</th></tr>"
        )
        for name, scores in methods.items():
            if scores:
                parts.append(
                    f"<tr><td class=l>{esc(name)}</td><td>{scores['accuracy']:.3f}</td>"
                    f"<td>{scores['nmi']:.3f}</td><td>{scores['ari']:.3f}</td></tr>"
                )
        parts.append("</table>")
    parts.append(
        "<h2>Summary</h2><table><tr><th class=l>cluster</th><th>size</th><th>labelled</th>"
        "<th class=l>majority</th><th>purity</th></tr>"
    )
    for row in summary.itertuples(index=False):
        name = cluster_folder(row.cluster, k)
        majority = "" if row.majority is None or pd.isna(row.majority) else esc(str(row.majority))
        share = "" if row.purity is None or pd.isna(row.purity) else f"{row.purity:.3f}"
        parts.append(
            f'<tr><td class=l><a href="#{name}">{name}</a></td><td>{row.size}</td>'
            f"<td>{row.labeled}</td><td class=l>{majority}</td><td>{share}</td></tr>"
        )
    parts.append("</table>")
    for row in summary.itertuples(index=False):
        name = cluster_folder(row.cluster, k)
        majority = "none" if row.majority is None or pd.isna(row.majority) else esc(repr(str(row.majority)))
        share = "n/a" if row.purity is None or pd.isna(row.purity) else f"{row.purity:.3f}"
        parts.append(
            f'<section id="{name}"><h2>{name}</h2><p>size {row.size} · labelled {row.labeled} · '
            f"majority {majority} · purity {share}</p>"
        )
        sheet = sheet_paths.get(int(row.cluster))
        if sheet is not None:
            parts.append(f'<img src="{_href(sheet, path)}" alt="contact sheet of {name}">')
        parts.append("</section>")
    parts.append("</body></html>")
    io.write_text("\n".join(parts) + "\n", path)
