"""The docs quote the committed run's figures as the committed metrics files have them.

docs/pipeline.md describes the demo's committed results: the test accuracy, the confidence of
the predictions and DEC's table. Those lines are made here from `metrics/*.json` and must be
in the page as they are, so a run that changes the committed metrics changes the docs with it
(the figures of earlier rounds and experiments are marked as such and not checked).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE_DOC = REPO / "docs" / "pipeline.md"


def _metrics(name: str) -> dict:
    return json.loads((REPO / "metrics" / f"{name}.json").read_text(encoding="utf-8"))


def _page() -> str:
    # Prose wraps anywhere: compare with every run of whitespace as one space.
    return " ".join(PIPELINE_DOC.read_text(encoding="utf-8").split())


def test_the_test_accuracy_in_the_docs_is_the_committed_one() -> None:
    accuracy = _metrics("eval")["accuracy"]
    row = next(
        line
        for line in PIPELINE_DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `convnet`")
    )
    assert f"| **{accuracy:.2%}** (target ≥ 97%) |" in row


def test_the_confidence_figures_in_the_docs_are_the_committed_ones() -> None:
    test = _metrics("predict")["splits"]["test"]
    assert test["confident_accuracy"] == 1.0  # "all of those are right"
    expected = (
        f"the model is right on {test['accuracy']:.2%} of the {test['images']} test images; "
        f"{test['coverage']:.1%} of them are predicted with a probability of at least "
        f"{_metrics('predict')['min_confidence']}, and all of those are right."
    )
    assert expected in _page()
    assert f"their mean is {test['mean_probability']:.2f}," in _page()


def test_decs_table_in_the_docs_is_the_committed_one() -> None:
    cluster = _metrics("cluster")
    methods, dec = cluster["methods"], cluster["dec"]

    def row(label: str, method: str) -> str:
        m = methods[method]
        return f"| {label} | {m['accuracy']:.3f} | {m['nmi']:.3f} | {m['ari']:.3f} |"

    n_init = cluster["kmeans"]["n_init"]
    rows = [
        row(f"k-means on the HOG features (`n_init` {n_init})", "kmeans_features"),
        row("k-means on the autoencoder embedding (DEC's start)", "kmeans_embedding"),
        row(
            f"DEC (converged after {dec['iterations']} batches, {dec['target_updates']} target updates)",
            "dec",
        ),
    ]
    assert dec["converged"]
    lines = PIPELINE_DOC.read_text(encoding="utf-8").splitlines()
    for expected in rows:
        assert expected in lines
