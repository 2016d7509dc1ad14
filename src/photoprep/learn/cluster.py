"""Unsupervised clustering of the feature vectors: DEC (Xie, Girshick & Farhadi, 2016) in PyTorch.

The method, step by step (``p`` is ``params.cluster``):

1. **Input.** The feature blocks named by ``p.blocks`` (``hog``, ``color``; their place in the
   vector comes from ``data/features/features.json``), each column centred when ``p.center``,
   then multiplied by one number ``s`` chosen as the paper does, so that the mean over images
   of ``(1/d) ||x||^2`` is 1. (The centring is ours: the 'original' HOG scaling leaves every
   column far from zero, and an autoencoder fed that learns little but the mean.)
2. **Pretraining.** An autoencoder ``d - dims[0] - ... - dims[-1]`` with a mirrored decoder,
   ReLU everywhere except the embedding and the reconstruction, trained to reconstruct its
   input from a copy with a share ``p.dropout`` of the inputs dropped (a denoising
   autoencoder, the paper's 0.2). ``p.pretrain: layerwise`` first trains each layer pair on
   its own as a denoising autoencoder (dropout on its input and on its hidden layer), as the
   paper does, then the whole stack end to end. Adam(W) with ``p.pretrain_lr`` and
   ``p.weight_decay``; the paper's SGD at 0.1 does not move the demo's loss within a budget
   of minutes.
3. **Start.** k-means (``p.kmeans_n_init`` restarts) in the embedding gives the centres.
4. **Refinement.** Soft assignments ``q_ij ∝ (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha+1)/2)``
   (Student's t), the sharpened target ``p_ij ∝ q_ij^2 / f_j`` with ``f_j = sum_i q_ij``,
   and SGD (``p.lr``, ``p.momentum``) on ``KL(P || Q)`` over the encoder and the centres.
   The target is recomputed over all images every ``p.update_interval`` batches (null: once
   per pass over the data, at least every 20 batches); refinement stops when fewer than ``p.tol`` of the hard
   assignments changed since the previous update, or after ``p.max_iter`` batches.

There is no fallback to the start: the refined clustering is what DEC returns, whether or
not it agrees better with labels. The metrics file reports the start (k-means on the
embedding) beside it, and k-means on the same input features, so a regression shows.

Clusters are numbered by size, largest first (ties: the cluster holding the earliest row).

Determinism: weights are initialised under ``torch.manual_seed(p.seed)`` (the global RNG is
restored afterwards); shuffles and dropout masks come from generators seeded with it; k-means
gets ``random_state=p.seed``; deterministic algorithms are on while DEC runs (CPU: always; CUDA:
where torch has them, warn-only). That is not enough on the CPU: with more than one thread,
MKL (torch's CPU matmul) sums in an order that varies from run to run (on 2 cores, about one
run in three or four ended with other weights, more often when other work loads the machine).
MKL's strict reproducibility mode (``MKL_CBWR=AUTO,STRICT``: a fixed summation order, whatever
the number of threads) with ``MKL_DYNAMIC=FALSE`` (no fewer threads than asked for when the
machine is busy) fixed it in every run tried, for some 10% of the speed. MKL reads both once,
before its first call, so importing this module sets them unless the environment already does.
A process that ran MKL before (a test session, a notebook) keeps the settings it started with;
there ``cluster.threads: 1`` is reproducible as well (about 1.6x slower on 2 cores). Results
also depend on the CPU's instruction set: bit-identity holds on one machine, not across them.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn

from photoprep.dataset.split import read_labels
from photoprep.errors import UserError
from photoprep.learn.devices import device_name, pick_device
from photoprep.learn.train import atomic_save
from photoprep.params import ClusterParams

# Before MKL's first call (see "Determinism" above); an explicit setting in the environment wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

MODEL_FORMAT = "photoprep.dec/1"
BLOCKS = ("hog", "color")
METHODS = ("kmeans_features", "kmeans_embedding", "dec")
TABLE_COLUMNS = ["source", "id", "row", "cluster", "confidence", "distance"]
_CHUNK = 8192  # rows per forward pass when embedding a whole set
# update_interval: null means one pass over the data, but never fewer batches than this: with the
# demo's 1,797 images a pass is 8 batches, and refreshing the target that often let the refinement
# lose accuracy against its start for one seed in five; every 20 it gained on all five (seeds 0-4).
MIN_UPDATE_INTERVAL = 20

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"cluster: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- input


def select_blocks(features: np.ndarray, info: dict[str, Any], blocks: Sequence[str]) -> np.ndarray:
    """The columns of the named blocks (``hog``, ``color``), in that order, as float32."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise UserError(f"cluster: features must be a N x D matrix (got shape {features.shape})")
    if list(blocks) == list(BLOCKS) and info.get("dim", features.shape[1]) == features.shape[1]:
        return np.ascontiguousarray(features, dtype=np.float32)
    parts = []
    for name in blocks:
        block = info.get(name)
        if not isinstance(block, dict) or "offset" not in block or "length" not in block:
            raise UserError(
                f"cluster.blocks: the features carry no block {name!r} (features.json has {sorted(info)})"
            )
        start, length = int(block["offset"]), int(block["length"])
        if start < 0 or start + length > features.shape[1]:
            raise UserError(
                f"cluster.blocks: block {name!r} lies outside the {features.shape[1]} feature columns"
            )
        parts.append(features[:, start : start + length])
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def input_scaling(x: np.ndarray, center: bool = True) -> tuple[np.ndarray, float]:
    """Column means (zeros when not centring) and the factor ``s`` with mean (1/d)||(x - m) s||^2 = 1."""
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64) if center else np.zeros(x.shape[1])
    centred = x - mean.astype(np.float32)
    mean_sq = float(np.mean(np.einsum("ij,ij->i", centred, centred, dtype=np.float64))) / max(x.shape[1], 1)
    scale = 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0
    return mean.astype(np.float32), scale


def scale_inputs(x: np.ndarray, center: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """``(x - mean) * s`` as the paper scales its input ((1/d)||x||^2 ≈ 1), with the mean and ``s``."""
    mean, scale = input_scaling(x, center)
    return ((np.asarray(x, dtype=np.float32) - mean) * np.float32(scale)).astype(np.float32), mean, scale


# --------------------------------------------------------------------------- networks


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers between consecutive widths, ReLU after every one but the last."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AutoEncoder(nn.Module):
    """``d - dims... - embedding`` encoder and its mirror image as decoder."""

    def __init__(self, input_dim: int, dims: Sequence[int]):
        super().__init__()
        widths = [int(input_dim), *map(int, dims)]
        self.encoder = _mlp(widths)
        self.decoder = _mlp(widths[::-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def linear_pairs(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """(encoder layer i, decoder layer reconstructing its input), outermost first."""
        enc = [m for m in self.encoder if isinstance(m, nn.Linear)]
        dec = [m for m in self.decoder if isinstance(m, nn.Linear)][::-1]
        return list(zip(enc, dec, strict=True))


def soft_assign(z: torch.Tensor, centres: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student's t similarity of each embedded point to each centre, rows summing to 1."""
    sq = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(dim=2)
    q = (1.0 + sq / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's sharpened target: ``q^2 / f`` per cluster frequency ``f``, rows summing to 1."""
    weight = q**2 / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


class DEC(nn.Module):
    """The trained clusterer: the encoder, the centres, and the input transform as buffers."""

    def __init__(self, input_dim: int, dims: Sequence[int], n_clusters: int, alpha: float = 1.0):
        super().__init__()
        self.encoder = _mlp([int(input_dim), *map(int, dims)])
        self.centres = nn.Parameter(torch.zeros(int(n_clusters), int(dims[-1])))
        self.register_buffer("input_mean", torch.zeros(int(input_dim)))
        self.register_buffer("input_scale", torch.ones(()))
        self.alpha = float(alpha)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of already scaled inputs."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_assign(self.encoder(x), self.centres, self.alpha)


# --------------------------------------------------------------------------- metrics


def unsupervised_accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Share of images whose cluster maps to their class under the best one-to-one mapping.

    The mapping maximises the matches (Hungarian method, scipy's ``linear_sum_assignment``);
    with more clusters than classes the extra clusters count as wrong, and vice versa.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} assignments")
    if not len(y_true):
        return float("nan")
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, c = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (c, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(y_true))


def agreement(y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, float]:
    """Unsupervised accuracy, NMI and ARI of assignments against labels, rounded to 6 places."""
    return {
        "accuracy": round(unsupervised_accuracy(y_true, y_pred), 6),
        "nmi": round(float(normalized_mutual_info_score(y_true, y_pred)), 6),
        "ari": round(float(adjusted_rand_score(y_true, y_pred)), 6),
    }


def purity(labels: Sequence[Any], clusters: Sequence[int]) -> pd.DataFrame:
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


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def deterministic(device: torch.device, seed: int, threads: int | None = None) -> Iterator[None]:
    """Deterministic algorithms, a seeded global RNG and a fixed thread count, all restored on exit."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    devices = [device.index or 0] if device.type == "cuda" else []
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
            torch.set_num_threads(old_threads)


def run_kmeans(x: np.ndarray, n_clusters: int, n_init: int, seed: int) -> KMeans:
    """scikit-learn's k-means (Lloyd, k-means++ starts, ``n_init`` restarts), seeded."""
    if len(x) < n_clusters:
        raise UserError(f"cluster.n_clusters: {n_clusters} clusters but only {len(x)} images")
    return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(
        np.asarray(x, dtype=np.float32)
    )


@torch.no_grad()
def embed(encoder: nn.Module, x: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """``encoder`` (any module) on every row of ``x`` (on its device), in chunks, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(x[s : s + chunk]) for s in range(0, len(x), chunk)]) if len(x) else x[:, :0]
    encoder.train(was_training)
    return out


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a fresh seeded permutation per pass, forever (the last batch of a pass
    may be short)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def _dropped(x: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` with a share ``rate`` of entries zeroed and the rest scaled by 1/(1-rate), from a seeded mask."""
    if rate <= 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=generator.device) >= rate
    return x * keep / (1.0 - rate)


def _adam(parameters: Any, p: ClusterParams) -> torch.optim.Optimizer:
    if p.weight_decay > 0:
        return torch.optim.AdamW(parameters, lr=p.pretrain_lr, weight_decay=p.weight_decay)
    return torch.optim.Adam(parameters, lr=p.pretrain_lr)


# --------------------------------------------------------------------------- pretraining


def _fit_layer_pair(
    enc: nn.Linear,
    dec: nn.Linear,
    h: torch.Tensor,
    enc_relu: bool,
    dec_relu: bool,
    p: ClusterParams,
    generator: torch.Generator,
    cpu_generator: torch.Generator,
) -> list[float]:
    """One layer pair as a denoising autoencoder of ``h`` (dropout on its input and hidden layer)."""
    opt = _adam([*enc.parameters(), *dec.parameters()], p)
    batches = _batches(len(h), p.batch_size, cpu_generator)
    steps = math.ceil(len(h) / p.batch_size)
    losses = []
    for _ in range(p.layer_epochs):
        total = 0.0
        for _ in range(steps):
            b = h[next(batches).to(h.device)]
            hidden = enc(_dropped(b, p.dropout, generator))
            hidden = F.relu(hidden) if enc_relu else hidden
            out = dec(_dropped(hidden, p.dropout, generator))
            out = F.relu(out) if dec_relu else out
            loss = F.mse_loss(out, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(h))
    return losses


def pretrain_autoencoder(
    x: torch.Tensor,
    p: ClusterParams,
    generator: torch.Generator,
    cpu_generator: torch.Generator,
    log: Log | None = None,
) -> tuple[AutoEncoder, list[dict[str, Any]]]:
    """The autoencoder of ``p.dims`` on scaled inputs ``x`` and its loss per epoch (``phase``,
    ``epoch``, ``loss``)."""
    log = log or (lambda line: None)
    model = AutoEncoder(x.shape[1], p.dims).to(x.device)
    history: list[dict[str, Any]] = []
    if p.pretrain == "layerwise":
        pairs = model.linear_pairs()
        h = x
        for i, (enc, dec) in enumerate(pairs):
            last = i == len(pairs) - 1
            losses = _fit_layer_pair(enc, dec, h, not last, i > 0, p, generator, cpu_generator)
            history += [
                {"phase": f"layer{i + 1}", "epoch": e + 1, "loss": loss} for e, loss in enumerate(losses)
            ]
            log(f"layer {i + 1}/{len(pairs)}: loss {losses[-1]:.4f}")
            h = embed(enc, h)
            h = F.relu(h) if not last else h
        del h
    opt = _adam(model.parameters(), p)
    batches = _batches(len(x), p.batch_size, cpu_generator)
    steps = math.ceil(len(x) / p.batch_size)
    model.train()
    for epoch in range(p.pretrain_epochs):
        total = 0.0
        for _ in range(steps):
            b = x[next(batches).to(x.device)]
            loss = F.mse_loss(model(_dropped(b, p.dropout, generator)), b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        history.append({"phase": "end_to_end", "epoch": epoch + 1, "loss": total / len(x)})
        if (epoch + 1) % 10 == 0 or epoch + 1 == p.pretrain_epochs:
            log(f"pretrain epoch {epoch + 1}/{p.pretrain_epochs}: loss {total / len(x):.4f}")
    model.eval()
    return model, history


# --------------------------------------------------------------------------- refinement


@dataclass
class Refinement:
    iterations: int
    updates: int
    converged: bool
    changed: float  # share of assignments changed at the last update
    history: list[dict[str, Any]]  # one row per target update


def refine(
    model: DEC,
    x: torch.Tensor,
    start: np.ndarray,
    p: ClusterParams,
    cpu_generator: torch.Generator,
    log: Log | None = None,
) -> Refinement:
    """KL(P || Q) self-training of the encoder and centres from the assignments ``start``."""
    log = log or (lambda line: None)
    n = len(x)
    interval = p.update_interval or max(math.ceil(n / p.batch_size), MIN_UPDATE_INTERVAL)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum)
    batches = _batches(n, p.batch_size, cpu_generator)
    previous = torch.as_tensor(start, dtype=torch.int64)
    it, updates, changed, loss_sum, loss_n = 0, 0, 0.0, 0.0, 0
    history: list[dict[str, Any]] = []
    converged = False
    model.train()
    while True:
        q = embed(model, x)
        target = target_distribution(q)
        hard = q.argmax(dim=1).cpu()
        changed = float((hard != previous).float().mean()) if n else 0.0
        previous = hard
        history.append({"iteration": it, "kl": loss_sum / loss_n if loss_n else None, "changed": changed})
        if it > 0 and changed < p.tol:
            converged = True
            break
        if it >= p.max_iter:
            break
        loss_sum, loss_n = 0.0, 0
        for _ in range(min(interval, p.max_iter - it)):
            idx = next(batches).to(x.device)
            q_batch = model(x[idx])
            loss = F.kl_div(q_batch.clamp_min(1e-12).log(), target[idx], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            loss_n += 1
            it += 1
        updates += 1
        if updates % 10 == 0:
            log(
                f"refine iteration {it}: kl {loss_sum / loss_n:.5f}, {changed:.2%} changed at the last update"
            )
    model.eval()
    return Refinement(iterations=it, updates=updates, converged=converged, changed=changed, history=history)


# --------------------------------------------------------------------------- the whole run


@dataclass
class ClusterResult:
    """Per image assignments, the trained model, the metrics and the progress of each phase."""

    table: pd.DataFrame  # source, id, row, cluster, confidence, distance
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    metrics: dict[str, Any]
    pretrain_history: pd.DataFrame  # phase, epoch, loss
    refine_history: pd.DataFrame  # iteration, kl, changed
    perf: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def _hard_assign(model: DEC, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Each scaled row's cluster, its q for that cluster (confidence) and its distance to the centre."""
    z = embed(model.encoder, x)
    q = soft_assign(z, model.centres, model.alpha)
    hard = q.argmax(dim=1)
    confidence = q.max(dim=1).values.cpu().numpy().astype(np.float64)
    distance = (z - model.centres[hard]).pow(2).sum(dim=1).sqrt().cpu().numpy().astype(np.float64)
    return hard, confidence, distance


def _by_size(assignments: np.ndarray, k: int) -> np.ndarray:
    """Permutation ``new_of_old``: clusters ranked by size (largest first), ties by their first row."""
    sizes = np.bincount(assignments, minlength=k)
    first = np.full(k, len(assignments), dtype=np.int64)
    np.minimum.at(first, assignments, np.arange(len(assignments)))
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c], c))
    new_of_old = np.empty(k, dtype=np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old


def _method_scores(
    labels: np.ndarray, assignments: dict[str, np.ndarray]
) -> dict[str, dict[str, float] | None]:
    known = np.array([lab is not None for lab in labels], dtype=bool)
    if not known.any():
        return dict.fromkeys(assignments)
    truth = np.array([str(v) for v in labels[known]], dtype=object)
    return {name: agreement(truth, a[known]) for name, a in assignments.items()}


@dataclass
class DecFit:
    """A trained DEC: its weights, final assignments (numbered by size), its start, and progress."""

    state_dict: dict[str, torch.Tensor]
    clusters: np.ndarray  # int64, numbered by size
    confidence: np.ndarray  # max_j q_ij
    distance: np.ndarray  # to the centre of the image's cluster, in the embedding
    start: np.ndarray  # k-means in the pretrained embedding: DEC's starting point
    refinement: Refinement
    pretrain_history: list[dict[str, Any]]
    perf: dict[str, Any]


def fit_dec(
    x_np: np.ndarray, mean: np.ndarray, scale: float, p: ClusterParams, log: Log | None = None
) -> DecFit:
    """Pretrain, start from k-means in the embedding, refine: DEC on inputs already scaled.

    ``mean`` and ``scale`` (from :func:`scale_inputs`) are stored in the model, so that
    :func:`assign` can take raw feature rows.
    """
    device = pick_device(p.device, "cluster.device")
    perf: dict[str, Any] = {}
    with deterministic(device, p.seed, p.threads):
        perf["device"] = device_name(device)
        generator = torch.Generator(device=device).manual_seed(p.seed)
        cpu_generator = torch.Generator().manual_seed(p.seed)
        x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32)).to(device)

        t0 = time.perf_counter()
        autoencoder, pre_history = pretrain_autoencoder(x, p, generator, cpu_generator, log)
        perf["pretrain_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        z0 = embed(autoencoder.encoder, x).cpu().numpy()
        km_embedding = run_kmeans(z0, p.n_clusters, p.kmeans_n_init, p.seed)
        perf["kmeans_embedding_s"] = time.perf_counter() - t0

        model = DEC(x.shape[1], p.dims, p.n_clusters, p.alpha).to(device)
        model.encoder.load_state_dict(autoencoder.encoder.state_dict())
        with torch.no_grad():
            model.centres.copy_(torch.from_numpy(km_embedding.cluster_centers_.astype(np.float32)))
            model.input_mean.copy_(torch.from_numpy(np.asarray(mean, dtype=np.float32)))
            model.input_scale.fill_(float(scale))
        del autoencoder

        t0 = time.perf_counter()
        refinement = refine(model, x, km_embedding.labels_, p, cpu_generator, log)
        perf["refine_s"] = time.perf_counter() - t0

        hard, confidence, distance = _hard_assign(model, x)
        hard_np = hard.cpu().numpy().astype(np.int64)
        new_of_old = _by_size(hard_np, p.n_clusters)
        with torch.no_grad():
            model.centres.copy_(model.centres[torch.as_tensor(np.argsort(new_of_old), device=device)])
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        del x
    return DecFit(
        state_dict=state,
        clusters=new_of_old[hard_np],
        confidence=confidence,
        distance=distance,
        start=np.asarray(km_embedding.labels_, dtype=np.int64),
        refinement=refinement,
        pretrain_history=pre_history,
        perf=perf,
    )


def cluster_features(
    features: np.ndarray,
    info: dict[str, Any],
    keys: pd.DataFrame,
    labels: Sequence[Any] | None,
    p: ClusterParams,
    log: Log | None = _stderr,
) -> ClusterResult:
    """Cluster every row of ``features`` with DEC and score it, with both k-means baselines.

    ``keys`` (``source``, ``id``, ``row``) names the rows; ``labels`` (one per row, None or NaN
    for unlabelled) is used for the metrics and nothing else.
    """
    log = log or (lambda line: None)
    t_start = time.perf_counter()
    n = len(features)
    if len(keys) != n:
        raise UserError(f"cluster: {n} feature rows but {len(keys)} keys")
    if n < p.n_clusters:  # before the scaling, which has nothing to average over an empty set
        raise UserError(f"cluster.n_clusters: {p.n_clusters} clusters but only {n} images")
    label_array = np.array(
        [
            None if lab is None or (isinstance(lab, float) and math.isnan(lab)) else str(lab)
            for lab in (labels if labels is not None else [None] * n)
        ],
        dtype=object,
    )
    if len(label_array) != n:
        raise UserError(f"cluster: {n} feature rows but {len(label_array)} labels")

    x_np, mean, scale = scale_inputs(select_blocks(features, info, p.blocks), p.center)
    pick_device(p.device, "cluster.device")  # a missing GPU stops the run before k-means takes its time
    perf: dict[str, Any] = {"device": None, "n_images": n, "input_dim": int(x_np.shape[1])}

    t0 = time.perf_counter()
    km_features = run_kmeans(x_np, p.n_clusters, p.kmeans_n_init, p.seed)
    perf["kmeans_features_s"] = time.perf_counter() - t0
    log(f"k-means on {x_np.shape[1]} feature columns: {perf['kmeans_features_s']:.1f} s")

    fit = fit_dec(x_np, mean, scale, p, log)
    perf.update(fit.perf)
    clusters, refinement, pre_history = fit.clusters, fit.refinement, fit.pretrain_history

    table = pd.DataFrame(
        {
            "source": keys["source"].astype(str).to_numpy(dtype=object),
            "id": keys["id"].astype(str).to_numpy(dtype=object),
            "row": keys["row"].astype("int64").to_numpy() if "row" in keys else np.arange(n, dtype=np.int64),
            "cluster": clusters,
            "confidence": np.round(fit.confidence, 6),
            "distance": np.round(fit.distance, 6),
        },
        columns=TABLE_COLUMNS,
    )

    assignments = {"kmeans_features": km_features.labels_, "kmeans_embedding": fit.start, "dec": clusters}
    scores = _method_scores(label_array, assignments)
    summary = purity(label_array, clusters)
    n_labeled = int(sum(lab is not None for lab in label_array))
    metrics = {
        "n_images": n,
        "n_labeled": n_labeled,
        "n_classes": len({lab for lab in label_array if lab is not None}),
        "n_clusters": p.n_clusters,
        "input": {
            "blocks": list(p.blocks),
            "dim": int(x_np.shape[1]),
            "center": p.center,
            "scale": round(float(scale), 6),
        },
        "kmeans": {"n_init": p.kmeans_n_init, "random_state": p.seed, "algorithm": "lloyd"},
        "methods": scores,
        "dec": {
            "iterations": refinement.iterations,
            "target_updates": refinement.updates,
            "converged": refinement.converged,
            "changed_at_last_update": round(refinement.changed, 6),
            "pretrain_epochs": p.pretrain_epochs,
            "pretrain": p.pretrain,
            "final_pretrain_loss": round(pre_history[-1]["loss"], 6) if pre_history else None,
        },
        "cluster_sizes": {
            str(int(c)): int(s) for c, s in zip(summary["cluster"], summary["size"], strict=True)
        },
        "purity": {
            str(int(c)): (None if pd.isna(v) else float(v))
            for c, v in zip(summary["cluster"], summary["purity"], strict=True)
        },
    }
    if scores["dec"] is not None:
        log(
            f"accuracy / NMI / ARI on {n_labeled} labelled images: "
            + "; ".join(
                f"{name} {s['accuracy']:.3f} / {s['nmi']:.3f} / {s['ari']:.3f}" for name, s in scores.items()
            )
        )
    meta = {
        "format": MODEL_FORMAT,
        "input_dim": int(x_np.shape[1]),
        "blocks": list(p.blocks),
        "feature_dim": int(np.asarray(features).shape[1]),
        "dims": list(p.dims),
        "n_clusters": p.n_clusters,
        "alpha": p.alpha,
        "params": p.model_dump(mode="json"),
        "iterations": refinement.iterations,
        "converged": refinement.converged,
    }
    perf["total_s"] = time.perf_counter() - t_start
    perf["threads"] = p.threads or torch.get_num_threads()
    perf["mkl"] = {"MKL_CBWR": os.environ.get("MKL_CBWR"), "MKL_DYNAMIC": os.environ.get("MKL_DYNAMIC")}
    pre = pd.DataFrame(pre_history, columns=["phase", "epoch", "loss"])
    ref = pd.DataFrame(refinement.history, columns=["iteration", "kl", "changed"])
    return ClusterResult(
        table=table,
        state_dict=fit.state_dict,
        meta=meta,
        metrics=metrics,
        pretrain_history=pre,
        refine_history=ref,
        perf=perf,
    )


# --------------------------------------------------------------------------- files


def labels_for(keys: pd.DataFrame, splits_dir: str | Path) -> list[str | None]:
    """Each key's label in the split tables (train, val, test, unlabeled), None when it has none."""
    known = read_labels(splits_dir).set_index(["source", "id"])["label"]
    found = known.reindex(pd.MultiIndex.from_frame(keys[["source", "id"]].astype(str)))
    return [None if pd.isna(v) else str(v) for v in found.to_numpy()]


def save_model(result: ClusterResult, path: str | Path) -> None:
    """``{"format", "state_dict", "meta"}`` with torch.save, atomically; loads with weights_only=True."""
    atomic_save({"format": MODEL_FORMAT, "state_dict": result.state_dict, "meta": result.meta}, Path(path))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DEC, dict[str, Any]]:
    """The DEC model of a file written by :func:`save_model`, in eval mode, and its metadata."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (run the cluster stage first: dvc repro cluster)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a photoprep DEC model")
    meta = blob["meta"]
    model = DEC(meta["input_dim"], meta["dims"], meta["n_clusters"], meta["alpha"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta


@torch.no_grad()
def assign(model: DEC, meta: dict[str, Any], features: np.ndarray, info: dict[str, Any]) -> pd.DataFrame:
    """Cluster, confidence and distance to its centre of new feature rows, with a trained model."""
    x = select_blocks(features, info, meta["blocks"])
    xt = (torch.from_numpy(x).to(model.centres.device) - model.input_mean) * model.input_scale
    hard, confidence, distance = _hard_assign(model, xt)
    return pd.DataFrame(
        {"cluster": hard.cpu().numpy().astype(np.int64), "confidence": confidence, "distance": distance}
    )


def history_tables(result: ClusterResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pretraining loss per epoch and the refinement per target update, rounded for CSV plots."""
    pre = result.pretrain_history.assign(loss=result.pretrain_history["loss"].round(6))
    ref = result.refine_history.copy()
    ref["kl"] = ref["kl"].astype(float).round(6)
    ref["changed"] = ref["changed"].round(6)
    return pre, ref
