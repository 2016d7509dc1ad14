"""How well a clustering agrees with labels: unsupervised accuracy, NMI, ARI, and purity per cluster.

Labels are used for these scores and nothing else (the clustering never sees them). The
one-to-one mapping of clusters to classes is scipy's Hungarian method; NMI and ARI are
scikit-learn's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["agreement", "purity", "unsupervised_accuracy"]


def unsupervised_accuracy(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> float:
    """Share of images whose cluster maps to their class under the best one-to-one mapping.

    The mapping maximises the matches (Hungarian method, scipy's ``linear_sum_assignment``);
    with more clusters than classes the extra clusters count as wrong, and vice versa.
    """
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} labels but {len(pred)} assignments")
    if not len(truth):
        return float("nan")
    classes, t = np.unique(truth, return_inverse=True)
    clusters, c = np.unique(pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (c, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(truth))


def agreement(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """Unsupervised accuracy, NMI and ARI of assignments against labels, rounded to 6 places."""
    return {
        "accuracy": round(unsupervised_accuracy(y_true, y_pred), 6),
        "nmi": round(float(normalized_mutual_info_score(y_true, y_pred)), 6),
        "ari": round(float(adjusted_rand_score(y_true, y_pred)), 6),
    }


def purity(labels: Sequence[Any] | np.ndarray, clusters: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """Per cluster: size, labelled members, majority label and its share among them."""
    frame = pd.DataFrame({"cluster": np.asarray(clusters, dtype=np.int64), "label": list(labels)})
    rows = []
    for c, members in frame.groupby("cluster", sort=True):
        known = members["label"].dropna()
        counts = known.value_counts(sort=False)
        if len(counts):
            best = int(counts.max())
            majority = sorted(str(k) for k, v in counts.items() if v == best)[0]
            share = round(best / len(known), 6)
        else:
            majority, share = None, None
        rows.append(
            {
                "cluster": int(c),
                "size": len(members),
                "labeled": len(known),
                "majority": majority,
                "purity": share,
            }
        )
    return pd.DataFrame(rows, columns=["cluster", "size", "labeled", "majority", "purity"])
