"""One report page for a run: ``reports/index.html``, from every stage's reports and metrics.

The page is what a person opens first after ``dvc repro``: the funnel as a table and a bar
chart (lines read → kept, each loss labelled with its reason), the duplicate and bucket contact
sheets, the broken files, the resolution plot, split sizes per class, the evaluation metrics
with the confusion matrix and the learning curves, the introspection images, the cluster
summary (linking to ``reports/clusters.html``) and the predictions' confidence curve.

It loads nothing from the network and links only relatively, so it opens from a file, an
artifact store or a zip. Charts are PNGs drawn here with matplotlib (no timestamps inside, so
two runs give the same bytes). A section whose inputs a run did not produce says so instead of
breaking the page.
"""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from photoprep.core.io import write_text, write_with
from photoprep.core.layout import Layout

__all__ = ["ReportInputs", "write_report"]

# The funnel's losses in pipeline order: (funnel key, label); "_by_reason" keys split one bar.
LOSSES = (
    ("malformed_lines", "malformed lines"),
    ("repeated_id_lines", "repeated ids"),
    ("fetch_failed_by_reason", "fetch failed"),
    ("exact_duplicates", "exact duplicates"),
    ("near_duplicates", "near duplicates"),
    ("broken_by_reason", "broken"),
    ("bucket_dropped", "bucket dropped"),
)
STEPS = ("lines_read", "unique_ids", "fetched", "after_dedup", "valid", "kept")
MAX_BROKEN_ROWS = 50


@dataclass(frozen=True)
class ReportInputs:
    """Where the page reads from: every report, metric and plot of a run, by :class:`Layout`."""

    paths: Layout

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def read_csv(self, path: Path) -> list[dict[str, str]]:
        if not path.is_file():
            return []
        return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))


# --------------------------------------------------------------------------- charts


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _figure_pair(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(width, height), dpi=100)


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    plt.close(fig)


def _loss_parts(funnel: dict[str, Any]) -> list[tuple[str, int]]:
    """(label, count) of every loss in the funnel, reasons apart, zero counts left out."""
    parts: list[tuple[str, int]] = []
    for key, label in LOSSES:
        value = funnel.get(key)
        if isinstance(value, dict):
            parts.extend((f"{label}: {reason}", int(n)) for reason, n in sorted(value.items()) if n)
        elif value:
            parts.append((label, int(value)))
    return parts


def draw_funnel(funnel: dict[str, Any], path: Path) -> None:
    """Counts after each step (blue) and each loss with its reason (red), as horizontal bars."""
    bars = [(step.replace("_", " "), int(funnel[step]), "#3b6ea8") for step in STEPS if step in funnel]
    bars += [(label, n, "#c0504d") for label, n in _loss_parts(funnel)]
    fig, ax = _figure(8, 0.35 * max(len(bars), 1) + 1)
    names = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    ax.barh(names, values, color=[b[2] for b in bars][::-1])
    for y, value in enumerate(values):
        ax.annotate(
            f"{value:,}", (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8
        )
    ax.set_xlabel("images (blue: after each step; red: lost, by reason)")
    ax.set_title("The funnel")
    _save(fig, path)


def _read_tsv(path: Path, column: str) -> tuple[list[float], list[float]]:
    if not path.is_file():
        return [], []
    rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(), delimiter="\t"))
    return [float(r["step"]) for r in rows], [float(r[column]) for r in rows]


def draw_learning_curves(live_dir: Path, path: Path) -> bool:
    """Loss and accuracy per epoch, train and val, from dvclive's files; False if there are none."""
    metrics = live_dir / "plots" / "metrics"
    fig, (left, right) = _figure_pair(10, 3.5)
    drawn = False
    for ax, name in ((left, "loss"), (right, "accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            x, y = _read_tsv(metrics / split / f"{name}.tsv", name)
            if x:
                ax.plot(x, y, style, label=split)
                drawn = True
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if not drawn:
        _close(fig)
        return False
    _save(fig, path)
    return True


def draw_confidence(rows: Sequence[dict[str, str]], path: Path) -> bool:
    """Coverage and accuracy at or above each confidence threshold; False without rows."""
    points = [(float(r["threshold"]), r["coverage"], r["accuracy"]) for r in rows]
    if not points:
        return False
    fig, ax = _figure(6, 3.5)
    x = [p[0] for p in points]
    for index, label in ((1, "coverage"), (2, "accuracy")):
        ax.plot(
            x, [float(p[index]) if p[index] not in ("", None) else float("nan") for p in points], label=label
        )
    ax.set_xlabel("minimum confidence")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Predictions on the test split at or above each confidence")
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- html


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(target: Path, page: Path) -> str:
    rel = os.path.relpath(target.resolve(), page.resolve().parent)
    return quote(Path(rel).as_posix())


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Page:
    """Sections of HTML, with relative links to the files that exist and a note for those that don't."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts: list[str] = []

    def h2(self, title: str, anchor: str) -> None:
        self.parts.append(f'<h2 id="{anchor}">{_esc(title)}</h2>')

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{text}</p>")

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def image(self, target: Path, alt: str) -> None:
        if target.is_file():
            src = _href(target, self.path)
            self.parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{_esc(alt)}"></a></figure>')
        else:
            self.missing(target)

    def link(self, target: Path, text: str) -> str:
        return f'<a href="{_href(target, self.path)}">{_esc(text)}</a>' if target.exists() else _esc(text)

    def missing(self, target: Path) -> None:
        self.parts.append(f'<p class="missing">not produced by this run: {_esc(target.name)}</p>')


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 0.5em 0 1.5em; }
nav a { margin-right: 1em; }
.missing { color: #888; font-style: italic; }
"""

SECTIONS = (
    ("funnel", "Funnel"),
    ("data", "Duplicates, broken files, buckets"),
    ("splits", "Splits"),
    ("evaluation", "Evaluation"),
    ("introspection", "Inside the model"),
    ("clusters", "Clusters"),
    ("predictions", "Predictions"),
)


def _funnel_section(page: _Page, funnel: dict[str, Any] | None, chart: Path) -> None:
    page.h2("Funnel", "funnel")
    if funnel is None:
        page.missing(Path("funnel.json"))
        return
    rows = [(step, f"{int(funnel[step]):,}") for step in STEPS if step in funnel]
    page.raw(_table(("after step", "images"), rows))
    losses = _loss_parts(funnel)
    page.raw(_table(("lost at", "images"), [(label, f"{n:,}") for label, n in losses] or [("nothing", 0)]))
    draw_funnel(funnel, chart)
    page.image(chart, "the funnel as a bar chart")


def _data_section(page: _Page, inputs: ReportInputs) -> None:
    paths = inputs.paths
    page.h2("Duplicates, broken files, buckets", "data")
    page.p(
        f"Every duplicate with what it duplicates: {page.link(paths.duplicates_csv, 'duplicates.csv')}; "
        "the largest near-duplicate groups:"
    )
    page.image(paths.duplicates_png, "near-duplicate groups")
    broken = inputs.read_csv(paths.broken_csv)
    page.p(f"Broken files ({len(broken):,}, every one in {page.link(paths.broken_csv, 'broken.csv')}):")
    columns = ("source", "id", "reason", "mime", "size")
    shown = [[row.get(c, "") for c in columns] for row in broken[:MAX_BROKEN_ROWS]]
    page.raw(_table(columns, shown) if shown else "<p>none</p>")
    page.p("Resolutions (one point per distinct size, kept buckets boxed) and samples of each kept bucket:")
    page.image(paths.resolutions_png, "resolution scatter plot")
    page.image(paths.buckets_png, "samples of each kept bucket")


def _splits_section(page: _Page, splits: dict[str, Any] | None) -> None:
    page.h2("Splits", "splits")
    if splits is None:
        page.missing(Path("splits.json"))
        return
    counts = splits.get("counts", {})
    names = [s for s in ("train", "val", "test") if s in counts]
    classes = [str(c) for c in splits.get("classes", [])]
    rows = [[c, *(counts[s].get(c, 0) for s in names)] for c in classes]
    rows.append(["all", *(sum(counts[s].values()) for s in names)])
    page.raw(_table(("class", *names), rows))
    totals = splits.get("totals", {})
    if totals.get("unlabeled"):
        page.p(f"{int(totals['unlabeled']):,} images carry no label (the unlabeled split).")


def _confusion_table(rows: Sequence[dict[str, str]]) -> str:
    labels = sorted({r["actual"] for r in rows} | {r["predicted"] for r in rows}, key=_natural)
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[r["actual"], r["predicted"]] = counts.get((r["actual"], r["predicted"]), 0) + 1
    body = [[f"actual {a}", *(counts.get((a, p), "") for p in labels)] for a in labels]
    return _table(("", *(f"pred {p}" for p in labels)), body)


def _natural(text: str) -> tuple[int, Any]:
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


def _evaluation_section(page: _Page, inputs: ReportInputs, curves: Path) -> None:
    paths = inputs.paths
    page.h2("Evaluation (test split)", "evaluation")
    metrics = inputs.read_json(paths.eval_metrics)
    if metrics is None:
        page.missing(paths.eval_metrics)
        return
    keys = ("accuracy", "top5_accuracy", "f1_macro", "f1_weighted", "loss", "n_test", "parameters")
    page.raw(_table(("metric", "value"), [(k, metrics[k]) for k in keys if k in metrics]))
    confusion = inputs.read_csv(paths.confusion_csv)
    if confusion:
        page.p("Confusion matrix (rows: actual class; columns: predicted):")
        page.raw(_confusion_table(confusion))
    if draw_learning_curves(paths.live_dir, curves):
        page.p("Learning curves (per epoch):")
        page.image(curves, "learning curves")
    page.p("Predictions on a sample (pred:true) and the misclassified test images:")
    page.image(paths.predictions_png, "sample predictions")
    page.image(paths.misclassified_png, "misclassified test images")


def _introspection_section(page: _Page, inputs: ReportInputs) -> None:
    paths = inputs.paths
    page.h2("Inside the model", "introspection")
    if not paths.tsne_png.is_file():
        page.missing(paths.tsne_png)
        return
    page.p(
        "The test images' penultimate-layer embeddings mapped to 2-D by t-SNE, coloured by true "
        f"class, with thumbnails of a sample (the points: {page.link(paths.tsne_csv, 'tsne.csv')}):"
    )
    page.image(paths.tsne_png, "t-SNE map of the test images' embeddings")
    page.p("The first layer's filters (each scaled to its own range):")
    page.image(paths.filters_png, "first-layer filters")
    page.p(
        "Top predictions with their probabilities, for the first test images of each class "
        f"(as a table: {page.link(paths.top5_csv, 'top5.csv')}):"
    )
    page.image(paths.top5_png, "top predictions per class")


def _clusters_section(page: _Page, inputs: ReportInputs) -> None:
    paths = inputs.paths
    page.h2("Clusters", "clusters")
    metrics = inputs.read_json(paths.cluster_metrics)
    if metrics is None:
        page.missing(paths.cluster_metrics)
        return
    methods = metrics.get("methods", {})
    rows = [(name, s.get("accuracy"), s.get("nmi"), s.get("ari")) for name, s in methods.items()]
    page.raw(_table(("method", "accuracy", "NMI", "ARI"), rows))
    page.p(
        f"{metrics.get('n_images', 0):,} images in {metrics.get('n_clusters', 0)} clusters; every cluster's "
        f"contact sheet, size and purity: {page.link(paths.clusters_html, 'clusters.html')}."
    )


def _predictions_section(page: _Page, inputs: ReportInputs, chart: Path) -> None:
    paths = inputs.paths
    page.h2("Predictions", "predictions")
    metrics = inputs.read_json(paths.predict_metrics)
    if metrics is None:
        page.missing(paths.predict_metrics)
        return
    rows = [
        (split, m.get("images"), m.get("confident"), m.get("coverage"), m.get("accuracy", ""))
        for split, m in metrics.get("splits", {}).items()
    ]
    page.p(f"At minimum confidence {metrics.get('min_confidence')}:")
    page.raw(_table(("split", "images", "confident", "coverage", "accuracy"), rows))
    if draw_confidence(inputs.read_csv(paths.confidence_csv), chart):
        page.image(chart, "coverage and accuracy per confidence threshold")
    page.image(paths.predicted_png, "the most confident images per predicted class")


def write_report(paths: Layout, out: Path, charts_dir: Path) -> Path:
    """Write the run's report page to ``out`` (charts into ``charts_dir``); returns ``out``."""
    inputs = ReportInputs(paths)
    page = _Page(out)
    nav = " ".join(f'<a href="#{anchor}">{_esc(title)}</a>' for anchor, title in SECTIONS)
    _funnel_section(page, inputs.read_json(paths.funnel), charts_dir / "funnel.png")
    _data_section(page, inputs)
    _splits_section(page, inputs.read_json(paths.splits_report))
    _evaluation_section(page, inputs, charts_dir / "learning_curves.png")
    _introspection_section(page, inputs)
    _clusters_section(page, inputs)
    _predictions_section(page, inputs, charts_dir / "confidence.png")
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>photoprep report</title>"
        f"<style>{STYLE}</style></head><body>\n<h1>photoprep report</h1>\n<nav>{nav}</nav>\n"
        + "\n".join(page.parts)
        + "\n</body></html>\n"
    )
    write_text(document, out)
    return out
