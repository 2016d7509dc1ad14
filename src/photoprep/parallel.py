"""Per-image work in batches, through joblib (or a Dask cluster), with progress (photoprep.console)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from joblib import Parallel, delayed, parallel_config

from photoprep.console import Progress
from photoprep.errors import UserError
from photoprep.params import ComputeParams

T = TypeVar("T")
R = TypeVar("R")


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    return [items[start : start + size] for start in range(0, len(items), size)]


@contextlib.contextmanager
def _backend(compute: ComputeParams) -> Iterator[None]:
    if compute.backend == "joblib":
        yield
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise UserError("compute.backend: dask needs `pip install dask[distributed]`") from None
    client = Client(compute.scheduler) if compute.scheduler else Client(processes=False)
    with client, parallel_config(backend="dask"):
        yield


def imap_batches(
    work: Callable[..., R],
    items: Sequence[T],
    compute: ComputeParams,
    *args: Any,
    desc: str = "",
) -> Iterator[tuple[Sequence[T], R]]:
    """Yield ``(batch, work(batch, *args))`` for consecutive batches of `items`, in input order.

    Each result is yielded as soon as it and every earlier one have come back from the workers,
    so a caller can write it out (or memoize it) before the next one arrives: nothing holds
    every result at once, and a killed run loses only the batches in flight.
    """
    if not len(items):
        return
    chunks = batches(items, compute.batch_size)
    bar = Progress(len(items), desc or "work", unit="img")
    try:
        if compute.n_jobs == 1 or len(chunks) == 1:
            for chunk in chunks:
                result = work(chunk, *args)
                bar.update(len(chunk))
                yield chunk, result
        else:
            with _backend(compute):
                runner = Parallel(n_jobs=compute.n_jobs, return_as="generator")
                results = runner(delayed(work)(c, *args) for c in chunks)
                for chunk, result in zip(chunks, results, strict=True):
                    bar.update(len(chunk))
                    yield chunk, result
    finally:
        bar.close()


def map_batches(
    work: Callable[..., list[R]],
    items: Sequence[T],
    compute: ComputeParams,
    *args: Any,
    desc: str = "",
) -> list[R]:
    """Run `work(batch, *args)` over batches of `items`; results come back flat, in input order."""
    out: list[R] = []
    for _, result in imap_batches(work, items, compute, *args, desc=desc):
        out.extend(result)
    return out
