"""The report page opens in a real headless Chromium with no broken link, missing image or
console error, and the checker itself sees each of those when they are there."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import chromium, open_page

from photoprep.core import io
from photoprep.core.layout import Layout
from photoprep.learn import introspect, models
from photoprep.review.page import write_report

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(chromium() is None, reason="needs Chromium (.ci/run installs it)")


@pytest.fixture
def run(tmp_path: Path) -> Layout:
    """A copy of the committed run's reports, metrics, plots and learning curves."""
    for folder in ("reports", "metrics", "plots", "dvclive"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    return Layout(tmp_path)


def _write(paths: Layout) -> Path:
    return write_report(paths, paths.report_page, paths.report_charts_dir)


def test_the_report_page_opens_cleanly_with_every_section(run: Layout):
    page = _write(run)
    check = open_page(page)
    assert check.clean, check
    assert check.images >= 9 and check.links >= 7
    text = page.read_text(encoding="utf-8")
    for anchor in ("funnel", "data", "splits", "evaluation", "introspection", "clusters", "predictions"):
        assert f'id="{anchor}"' in text
    assert 'href="clusters.html"' in text
    assert "http://" not in text and "https://" not in text


def _introspect_files(paths: Layout) -> None:
    """What the introspect stage writes, drawn by its own functions from a fresh model and
    random embeddings and probabilities (the committed run may predate the stage)."""
    rng = np.random.default_rng(0)
    n, classes = 60, [str(d) for d in range(10)]
    labels = np.arange(n) % 10
    table = pd.DataFrame({"id": [f"img-{i}" for i in range(n)]})
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
    coords = introspect.tsne_map(rng.normal(size=(n, 8)), 30.0, 0)
    io.write_table(introspect.tsne_table(coords, labels, probs.argmax(1), classes, table), paths.tsne_csv)
    introspect.draw_tsne(coords, labels, classes, pixels, 10, paths.tsne_png)
    model = models.build_model(models.Architecture.of("convnet", 10, (32, 32), width=8, depth=2))
    introspect.draw_filters(introspect.first_layer_filters(model, {"input": "images"}, 64), paths.filters_png)
    top = introspect.top_predictions(probs, labels, classes, table, 2, 5)
    io.write_table(top.drop(columns="row"), paths.top5_csv)
    introspect.draw_top(top, pixels, 5, paths.top5_png)


def test_the_introspection_section_shows_and_links_the_introspect_files(run: Layout):
    _introspect_files(run)
    page = _write(run)
    check = open_page(page)
    assert check.clean, check
    text = page.read_text(encoding="utf-8")
    for name in ("tsne.png", "filters.png", "top5.png", "top5.csv", "../plots/tsne.csv"):
        assert f'href="{name}"' in text, name
    for name in ("tsne.png", "filters.png", "top5.png"):
        assert f'<img src="{name}"' in text, name


def test_the_page_is_the_same_bytes_on_a_second_run(run: Layout):
    first = _write(run).read_bytes()
    charts = {p.name: p.read_bytes() for p in run.report_charts_dir.iterdir()}
    assert _write(run).read_bytes() == first
    assert {p.name: p.read_bytes() for p in run.report_charts_dir.iterdir()} == charts


def test_a_missing_input_is_said_not_broken(run: Layout):
    run.cluster_metrics.unlink()
    page = _write(run)
    assert "not produced by this run: cluster.json" in page.read_text(encoding="utf-8")
    assert open_page(page).clean


def test_the_checker_sees_a_missing_image_a_broken_link_and_a_console_error(run: Layout):
    page = _write(run)
    run.buckets_png.unlink()
    text = page.read_text(encoding="utf-8").replace(
        "</body>",
        '<a href="nowhere.html">x</a><a href="#no-such-anchor">y</a><script>notAFunction()</script></body>',
    )
    page.write_text(text, encoding="utf-8")
    check = open_page(page)
    assert any("buckets.png" in src for src in check.broken_images)
    assert "nowhere.html" in check.broken_links and "#no-such-anchor" in check.broken_links
    assert any("notAFunction" in e for e in check.console_errors)
