"""Training on several processes with DistributedDataParallel (``train.nproc`` or torchrun).

A rank is a process that :mod:`photoprep.learn.launch` (``train.nproc: N > 1``) or an external
torchrun (``RANK`` and ``WORLD_SIZE`` set, e.g. ``torchrun --nnodes 2 --nproc-per-node 4 ...``;
its counts win over ``train.nproc``) started. ``train.nproc: 1`` without torchrun is the
single-process path, untouched: :func:`join` returns None and nothing here runs.

Each rank pins ``compute.threads // ranks on this machine`` CPU threads (at least one,
:func:`photoprep.portable.processes_here`), gathers the train and val splits from the
memory-mapped uint8 array (:func:`photoprep.learn.data.load_data`; no per-sample loader), joins
the process group (:func:`join`: NCCL when the device is CUDA, one GPU per local rank; gloo on the
CPU) and trains a DDP copy of the same seeded model. Every epoch every rank draws the same
permutation and augmentation from ``train.seed`` and takes its strided slice of it (positions
rank, rank + N, ... of the first N x floor(n / N)), so a run is reproducible for a given N.
DDP averages the gradients, so the effective batch is N x ``train.batch_size`` with
floor(n / N) // batch_size steps per epoch, and ``train.lr`` is used as given (no scaling).

Rank 0 alone validates and broadcasts val loss and accuracy (:meth:`World.from_main`), so model
selection and early stopping agree on every rank; rank 0 alone writes checkpoints, dvclive logs,
the model file and perf. A rank that fails makes torchrun stop the others, and
:func:`photoprep.learn.launch.launch` raises one UserError (each rank's error is printed above it).

The NCCL path is written but untested here (no GPU on the machines this was built on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from photoprep.core.errors import UserError
from photoprep.learn import devices
from photoprep.learn.launch import env_rank

__all__ = ["World", "join", "leave"]


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self) -> tuple[int, int]:
        """(rank, size): which strided slice of each epoch's order this rank trains on."""
        return self.rank, self.size

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (the same result on every rank)."""
        out = value.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(value.device)

    def from_main(self, compute: Callable[[], Sequence[float]], length: int) -> tuple[float, ...]:
        """``compute()`` (``length`` floats) on rank 0, broadcast: every rank gets rank 0's values."""
        buf = torch.zeros(length, dtype=torch.float64, device=self.device)
        if self.is_main:
            buf.copy_(torch.tensor(list(compute()), dtype=torch.float64))
        dist.broadcast(buf, src=0)
        return tuple(float(v) for v in buf.cpu())

    def agree(self, value: int, what: str) -> None:
        """Stop with a UserError unless every rank holds the same ``value``."""
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        low, high = -int(both[1]), int(both[0])
        if low != high:
            raise UserError(f"the {self.size} training ranks disagree on {what} ({low} to {high})")


def join(device_choice: str) -> World | None:
    """Join the process group of a torchrun launch (None for a single process): NCCL when
    ``device_choice`` resolves to CUDA (this rank's GPU = its local rank), gloo otherwise."""
    found = env_rank()
    if found is None or found[1] == 1:
        return None
    rank, size, local_rank = found
    device = devices.pick_device(device_choice, "train.device")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "at most one rank per GPU (torchrun --nproc-per-node, train.nproc)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=30))
    return World(rank, size, local_rank, backend, device)


def leave(world: World | None) -> None:
    """Wait for every rank, then leave the process group."""
    if world is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
