"""DEC (Xie, Girshick & Farhadi, 2016) in PyTorch: the autoencoder, its pretraining, the refinement.

:func:`fit_dec` takes feature rows already scaled (see :mod:`photoprep.learn.cluster`, which
chooses the input and scores the result) and runs, with ``p`` = ``params.cluster``:

1. **Pretraining.** An autoencoder ``d - dims[0] - ... - dims[-1]`` with a mirrored decoder,
   ReLU everywhere except the embedding and the reconstruction, trained to reconstruct its
   input from a copy with a share ``p.dropout`` of the inputs dropped (a denoising
   autoencoder, the paper's 0.2). ``p.pretrain: layerwise`` first trains each layer pair on
   its own as a denoising autoencoder (dropout on its input and on its hidden layer), as the
   paper does, then the whole stack end to end. Adam(W) with ``p.pretrain_lr`` and
   ``p.weight_decay``; the paper's SGD at 0.1 does not move the demo's loss within a budget
   of minutes.
2. **Start.** k-means (``p.kmeans_n_init`` restarts) in the embedding gives the centres.
3. **Refinement.** Soft assignments ``q_ij ∝ (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha+1)/2)``
   (Student's t), the sharpened target ``p_ij ∝ q_ij^2 / f_j`` with ``f_j = sum_i q_ij``,
   and SGD (``p.lr``, ``p.momentum``) on ``KL(P || Q)`` over the encoder and the centres.
   The target is recomputed over all images every ``p.update_interval`` batches (null: once
   per pass over the data, at least every 20 batches); refinement stops when fewer than ``p.tol`` of the hard
   assignments changed since the previous update, or after ``p.max_iter`` batches.

There is no fallback to the start: the refined clustering is what DEC returns, whether or
not it agrees better with labels. Clusters are numbered by size, largest first (ties: the
cluster holding the earliest row). The model file (``models/dec.pt``) is written and read by
:mod:`photoprep.learn.checkpoint` (format ``photoprep.dec/1``); :func:`load_dec` rebuilds the
network from it.

Determinism: weights are initialised under ``torch.manual_seed(p.seed)`` (the global RNG is
restored afterwards); shuffles and dropout masks come from generators seeded with it; k-means
gets ``random_state=p.seed``; deterministic algorithms are on while DEC runs (CPU: always; CUDA:
where torch has them, warn-only). That is not enough on the CPU: with more than one thread,
MKL (torch's CPU matmul) sums in an order that varies from run to run (on 2 cores, about one
run in three or four ended with other weights, more often when other work loads the machine).
MKL's strict reproducibility mode (``MKL_CBWR=...,STRICT``: a fixed summation order, whatever
the number of threads) with ``MKL_DYNAMIC=FALSE`` (no fewer threads than asked for when the
machine is busy) fixed it in every run tried, for some 10% of the speed. Both are set, with the
rest of the CPU math's per-CPU choices, by :mod:`photoprep.portable` before torch loads (the
``learn`` room pins its defaults on import; stages pin from ``compute.*``), which is also what
makes the bytes the same across CPUs. ``cluster.threads`` overrides the thread count inside DEC.

Why one module
    Pretraining, the start and the refinement are the steps of one algorithm that hand one
    pair of seeded generators from step to step: which draw comes from where decides the
    bytes of ``models/dec.pt``. Kept together, :func:`fit_dec` reads top to bottom in the
    order of those draws; the networks, the batch and dropout helpers and the deterministic
    context serve only these steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from photoprep import portable
from photoprep.core.errors import UserError
from photoprep.core.params import ClusterParams
from photoprep.learn.checkpoint import DEC_FORMAT, read_model_file
from photoprep.learn.devices import device_name, pick_device

__all__ = [
    "DEC",
    "MIN_UPDATE_INTERVAL",
    "AutoEncoder",
    "DecFit",
    "Log",
    "Refinement",
    "deterministic",
    "embed",
    "fit_dec",
    "hard_assign",
    "load_dec",
    "pretrain_autoencoder",
    "refine",
    "run_kmeans",
    "soft_assign",
    "target_distribution",
]


_CHUNK = 8192  # rows per forward pass when embedding a whole set
# update_interval: null means one pass over the data, but never fewer batches than this: with the
# demo's 1,797 images a pass is 8 batches, and refreshing the target that often let the refinement
# lose accuracy against its start for one seed in five; every 20 it gained on all five (seeds 0-4).
MIN_UPDATE_INTERVAL = 20

Log = Callable[[str], None]


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

    input_mean: torch.Tensor
    input_scale: torch.Tensor

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


def _adam(parameters: Any, p: ClusterParams, device: torch.device) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay), fused: the same bits on any CPU (photoprep.portable)."""
    fused = portable.cpu_optimizer_options(device.type)
    if p.weight_decay > 0:
        return torch.optim.AdamW(parameters, lr=p.pretrain_lr, weight_decay=p.weight_decay, **fused)
    return torch.optim.Adam(parameters, lr=p.pretrain_lr, **fused)


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
    opt = _adam([*enc.parameters(), *dec.parameters()], p, h.device)
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
    opt = _adam(model.parameters(), p, x.device)
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


# --------------------------------------------------------------------------- the whole fit


@torch.no_grad()
def hard_assign(model: DEC, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Each scaled row's cluster, its q for that cluster (confidence) and its distance to the centre."""
    z = embed(model.encoder, x)
    q = soft_assign(z, model.centres, model.alpha)
    hard = q.argmax(dim=1)
    confidence = q.max(dim=1).values.cpu().numpy().astype(np.float64)
    # Rooted by numpy: torch.sqrt's MKL kernel rounds by the CPU's approximate square root.
    squared = (z - model.centres[hard]).pow(2).sum(dim=1).cpu().numpy().astype(np.float64)
    distance = np.sqrt(squared)
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

        hard, confidence, distance = hard_assign(model, x)
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


def load_dec(path: str | Path, device: str | torch.device = "cpu") -> tuple[DEC, dict[str, Any]]:
    """The DEC model of a ``photoprep.dec/1`` file, in eval mode, and its metadata."""
    state, meta = read_model_file(path, DEC_FORMAT)
    model = DEC(meta["input_dim"], meta["dims"], meta["n_clusters"], meta["alpha"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta
