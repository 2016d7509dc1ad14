"""Looking inside a trained model, on the test split: what it sees, what it learned, how sure it is.

:func:`photoprep.learn.embed.forward` runs the test images through the model once and keeps
both the embeddings (what the classifier reads: a timm model's pooled features, a small net's
penultimate layer; the same vectors ``cluster.input: embeddings`` clusters) and the class
probabilities. From them:

- :func:`tsne_map` maps the embeddings to 2-D with scikit-learn's t-SNE (``init="pca"``, a
  fixed random state and ``n_jobs=1``: the same map on every run); :func:`draw_tsne` draws it
  coloured by true class, with thumbnails of a sample of the images where they fall;
- :func:`first_layer_filters` takes the first convolution's kernels (an mlp on pixels: its
  first linear layer's weights as images), :func:`draw_filters` draws them as a grid;
- :func:`top_predictions` lists, for the first ``per_class`` test images of each class, the
  top-k classes with their probabilities; :func:`draw_top` draws them as a contact sheet.

Every output is deterministic: rounded coordinates and probabilities, PNGs drawn without
timestamps (PIL without metadata, matplotlib with ``Software`` removed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from photoprep.core.io import write_with
from photoprep.images import sheets
from photoprep.learn.evaluate import thumb

__all__ = [
    "draw_filters",
    "draw_top",
    "draw_tsne",
    "first_layer_filters",
    "top_predictions",
    "tsne_map",
    "tsne_table",
]

DECIMALS = 4
FILTER_PX = 32  # each filter is enlarged (nearest neighbour) to at least this many pixels
FILTER_COLUMNS = 16


def tsne_map(embeddings: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of the rows (N x 2, rounded); perplexity lowered to (N - 1) / 3 for small N."""
    n = len(embeddings)
    if n < 4:
        return np.zeros((n, 2), np.float64)
    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=2,
        perplexity=min(perplexity, (n - 1) / 3),
        init="pca",
        random_state=seed,
        n_jobs=1,
    )
    coords = tsne.fit_transform(embeddings.astype(np.float64))
    return np.round(coords, DECIMALS)


def tsne_table(
    coords: np.ndarray, labels: np.ndarray, predicted: np.ndarray, classes: list[str], table: pd.DataFrame
) -> pd.DataFrame:
    """One row per test image: x, y, actual, predicted (class names), id (plots/tsne.csv)."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {
            "x": coords[:, 0] if len(coords) else [],
            "y": coords[:, 1] if len(coords) else [],
            "actual": names[labels] if len(labels) else [],
            "predicted": names[predicted] if len(predicted) else [],
            "id": table["id"].astype(str).to_numpy(),
        }
    )


def _spread(n: int, count: int) -> np.ndarray:
    if not n or not count:
        return np.zeros(0, int)
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))


def draw_tsne(
    coords: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    pixels: np.ndarray,
    thumbnails: int,
    path: str | Path,
) -> None:
    """The map: one dot per test image coloured by true class, and thumbnails of
    ``thumbnails`` images spread evenly over the split, centred where they fall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(9, 8), dpi=100)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, name in enumerate(classes):
        mine = labels == k
        if mine.any():
            ax.scatter(coords[mine, 0], coords[mine, 1], s=14, color=cmap(k % cmap.N), label=name, alpha=0.8)
    if len(coords):
        lo, hi = coords.min(0), coords.max(0)
        hx, hy = (0.025 * np.maximum(hi - lo, 1e-6)).tolist()  # square on the square-ish axes
        for i in _spread(len(coords), thumbnails):
            x, y = coords[i]
            ax.imshow(pixels[i], extent=(x - hx, x + hx, y - hy, y + hy), zorder=3, interpolation="nearest")
            edge = cmap(int(labels[i]) % cmap.N)
            box = Rectangle((x - hx, y - hy), 2 * hx, 2 * hy, fill=False, lw=1.5, ec=edge, zorder=4)
            ax.add_patch(box)
        ax.set_xlim(lo[0] - 2 * hx, hi[0] + 2 * hx)
        ax.set_ylim(lo[1] - 2 * hy, hi[1] + 2 * hy)
        ax.set_aspect("auto")
        ax.legend(title="true class", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"t-SNE of the penultimate layer ({len(coords)} test images; thumbnails: a sample)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    plt.close(fig)


def first_layer_filters(model: nn.Module, meta: dict[str, Any], count: int) -> np.ndarray | None:
    """Up to ``count`` first-layer filters as uint8 images (F x h x w x 3), each scaled to its own
    range: the first convolution's kernels, or an mlp-on-pixels' first linear weights as
    3 x H x W images. None when the first layer does not look at pixels (an mlp on features)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    weight: torch.Tensor | None = None
    if conv is not None and conv.in_channels == 3:
        weight = conv.weight.detach().float()
    elif conv is None and meta.get("input") == "images" and meta.get("input_size"):
        linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
        h, w = meta["input_size"]
        weight = linear.weight.detach().float().reshape(-1, 3, h, w)
    if weight is None:
        return None
    weight = weight[:count].cpu()
    lo = weight.amin((1, 2, 3), keepdim=True)
    hi = weight.amax((1, 2, 3), keepdim=True)
    scaled = (weight - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def draw_filters(filters: np.ndarray | None, path: str | Path) -> None:
    """The filters as a grid (``FILTER_COLUMNS`` a row), enlarged with nearest neighbour."""
    if filters is None or not len(filters):
        sheets.contact_sheet([], [], path)
        return
    factor = max(1, math.ceil(FILTER_PX / min(filters.shape[1:3])))
    big = np.repeat(np.repeat(filters, factor, 1), factor, 2)
    rows, titles = [], []
    for start in range(0, len(big), FILTER_COLUMNS):
        rows.append([(big[i], f"{i}") for i in range(start, min(start + FILTER_COLUMNS, len(big)))])
        titles.append(f"filters {start}-{start + len(rows[-1]) - 1}")
    sheets.contact_sheet(rows, titles, path, title_width=90)


def top_predictions(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    table: pd.DataFrame,
    per_class: int,
    top_k: int,
) -> pd.DataFrame:
    """The first ``per_class`` test images of each true class (in split order) with their
    ``top_k`` classes and probabilities (rounded): id, actual, class_1, probability_1, ..."""
    k = min(top_k, probs.shape[1]) if probs.ndim == 2 else 0
    picks = np.concatenate(
        [np.flatnonzero(labels == c)[:per_class] for c in range(len(classes))] or [np.zeros(0, int)]
    ).astype(int)
    out: dict[str, Any] = {
        "row": picks,
        "id": table["id"].astype(str).to_numpy()[picks],
        "actual": [classes[labels[i]] for i in picks],
    }
    order = np.argsort(-probs[picks], axis=1, kind="stable")[:, :k] if len(picks) else np.zeros((0, k), int)
    for j in range(k):
        out[f"class_{j + 1}"] = [classes[c] for c in order[:, j]]
        out[f"probability_{j + 1}"] = np.round(probs[picks, order[:, j]].astype(np.float64), DECIMALS)
    return pd.DataFrame(out)


def draw_top(top: pd.DataFrame, pixels: np.ndarray, top_k: int, path: str | Path) -> None:
    """A row per true class: each image captioned with its top predictions, ``prob class`` a line."""
    k = sum(1 for c in top.columns if c.startswith("class_"))
    rows: list[list[tuple[np.ndarray, str]]] = []
    titles: list[str] = []
    for actual, group in top.groupby("actual", sort=False):
        cells = []
        for _, r in group.iterrows():
            # Probability first: a long class name is what the sheet's caption width cuts.
            lines = [f"{r[f'probability_{j + 1}']:.2f} {r[f'class_{j + 1}']}" for j in range(k)]
            cells.append((thumb(pixels[int(r["row"])]), "\n".join(lines)))
        rows.append(cells)
        titles.append(f"true {actual}")
    if rows:
        shape = rows[0][0][0].shape
        rows = [[(_fit(p, shape), c) for p, c in row] for row in rows]
    sheets.contact_sheet(rows, titles, path, title_width=80, caption_lines=max(1, min(k, top_k)))


def _fit(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Pad or crop a thumbnail to ``shape`` (a contact sheet's cells share one size)."""
    out = np.full(shape, 255, np.uint8)
    h, w = min(shape[0], pixels.shape[0]), min(shape[1], pixels.shape[1])
    out[:h, :w] = pixels[:h, :w]
    return out
