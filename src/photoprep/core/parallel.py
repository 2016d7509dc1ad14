"""Per-image work in batches, through joblib or as tasks on a Dask cluster, with progress.

`imap_batches` cuts the items (blob locations, pixel rows, positions) into batches of
``compute.batch_size`` and yields each batch's result in input order, as soon as it and every
earlier one are back, so the caller memoizes it before the next arrives.

``compute.backend: dask`` runs each batch as one Dask task (`Client.submit`), always on the
cluster (even one batch: the data may be reachable only there):

- ``compute.scheduler: local`` (or null) starts a `LocalCluster` of ``compute.n_jobs`` worker
  processes with 1 thread each, closed (processes ended) when the batches are done;
  ``tcp://host:port`` joins a running scheduler and leaves it running.
- At most ``2 x`` the cluster's threads tasks are in flight, so memory stays flat whatever the
  number of batches. A batch over `SCATTER_BYTES` (pixel rows) goes to a worker directly
  (`Client.scatter(direct=True)`), never through the scheduler; locations are small.
- An exception on a worker is raised here as the same exception (the stage's rows with a
  reason stay rows: they are results); the batches still in flight are cancelled.
- Workers must run this photoprep's code, or outputs could differ: `code_fingerprint` of every
  worker is compared with ours before any batch goes out.
- Dask's own logging is held at ERROR; the stage prints one line, where its work ran.

Under joblib, work marked `in_threads` (the features: numpy and OpenCV on a few images at a
time; the bucket stage's resize: Pillow's decode and resize; both release the GIL for most of
their time) runs in ``compute.n_jobs`` threads of the stage's process rather than in worker
processes. A worker process imports numpy, OpenCV and photoprep again and holds its own copy of
them (about 90 to 110 MB each); a thread holds only its batch. At 20,000 photos (this 2-core
AMD) the features took 4.0 s of wall in two threads against 4.5 s in two processes, and the
stage's process tree peaked at 109 MB against 290; the bucket stage 6.8 s against 7.4 and 113
MB against 298. The dedup stage's probe stays in processes: in threads it took 10 % more wall
(19.6 s against 17.7 at 20,200 photos), its workers' memory being given back before its table
steps anyway (`release_workers`).

`map_shared` runs the parts of a table step that all read one large array (the near search's
keys): in threads of the stage's process, or as Dask tasks, the array sent to each worker once.

Why one module
    joblib's and Dask's paths share the batches, the order results come back in, the bound on
    what is in flight and the one session a stage opens; apart, each would need the other's
    rules for the outputs to stay the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

import photoprep
from photoprep.core import console
from photoprep.core.console import Progress
from photoprep.core.errors import UserError
from photoprep.core.params import ComputeParams

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W", bound=Callable[..., Any])
S = TypeVar("S", bound=Sequence[Any] | np.ndarray)

# The attribute `in_threads` sets on a work function.
_IN_THREADS = "_photoprep_in_threads"
SCATTER_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10
WORKERS_TIMEOUT_S = 60
_DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")
# joblib's warning when a generator of results is closed early ('... executed but not used', '...
# cancelled'); its start is the count of either.
_EARLY_EXIT = r"\d+ tasks (have been successfully executed|which were still being processed)"
# About what one joblib worker spends starting (importing photoprep, OpenCV, scikit-image): a re-run's
# few new photos took 1.1 to 1.3 CPU s more with 2 workers than in the stage's own process (features
# of 470 photos at 40,000, this 2-core AMD).
WORKER_START_S = 0.5


def batches(items: S, size: int) -> list[S]:
    """Consecutive slices of at most `size` items (of a sequence, or views of an array)."""
    return [cast(S, items[start : start + size]) for start in range(0, len(items), size)]


def code_fingerprint() -> str:
    """sha256 of every module of the installed photoprep package (paths and bytes)."""
    root = Path(photoprep.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _quiet_dask_logs() -> None:
    for name in _DASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _local_workers(compute: ComputeParams) -> int:
    return compute.n_jobs if compute.n_jobs > 0 else os.cpu_count() or 1


# The client of the `session` open in this process, by (scheduler, n_jobs): batches reuse it.
_OPEN: dict[tuple[str, int], Any] = {}
# Holds True once joblib ran a batch in worker processes that `release_workers` has not ended.
_PROCESS_WORKERS: list[bool] = []


@contextlib.contextmanager
def session(compute: ComputeParams) -> Iterator[None]:
    """Keep one Dask client (and a LocalCluster's processes) for every `imap_batches` inside.

    A stage that sends batches more than once (dedup: the probe, then the thumbnails) starts its
    LocalCluster once. With joblib it does nothing.
    """
    if compute.backend != "dask":
        yield
        return
    with dask_client(compute):
        yield


@contextlib.contextmanager
def dask_client(compute: ComputeParams) -> Iterator[Any]:
    """A `distributed.Client` for `compute` (a LocalCluster or a running scheduler), closed after;
    the one of an open `session` when there is one."""
    key = (compute.scheduler or "local", compute.n_jobs)
    if key in _OPEN:
        yield _OPEN[key]
        return
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise UserError("compute.backend: dask needs Dask: pip install 'photoprep[dask]'") from None
    _quiet_dask_logs()
    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GB"}))
        if compute.scheduler in (None, "local"):
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=_local_workers(compute),
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=":0",
                    silence_logs=logging.CRITICAL,
                )
            )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(compute.scheduler, timeout=CONNECT_TIMEOUT_S))
            except OSError as exc:
                raise UserError(
                    f"compute.scheduler: no Dask scheduler answers at {compute.scheduler} ({exc})"
                ) from None
            try:
                client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
            except TimeoutError:
                raise UserError(
                    f"compute.scheduler: the Dask scheduler at {compute.scheduler} has no worker "
                    f"after {WORKERS_TIMEOUT_S} s"
                ) from None
        _check_code(client)
        threads = client.nthreads()
        console.note(f"dask: {len(threads)} workers at {client.scheduler.address}")
        _OPEN[key] = client
        try:
            yield client
        finally:
            del _OPEN[key]


def _check_code(client: Any) -> None:
    ours = code_fingerprint()
    try:
        theirs = client.run(code_fingerprint)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"compute.backend: dask: the workers cannot import photoprep ({exc})") from None
    other = sorted(address for address, fingerprint in theirs.items() if fingerprint != ours)
    if other:
        raise UserError(
            f"compute.backend: dask: {len(other)} worker(s) run other photoprep code than this stage "
            f"(e.g. {other[0]}): install the same version there"
        )


def _on_dask(
    work: Callable[..., R], chunks: Sequence[S], compute: ComputeParams, args: tuple[Any, ...]
) -> Iterator[R]:
    """`work(chunk, *args)` of each chunk as a Dask task; results in input order, bounded in flight."""
    with dask_client(compute) as client:
        yield from _tasks(client, work, chunks, args)


def _tasks(client: Any, work: Callable[..., R], chunks: Sequence[Any], args: tuple[Any, ...]) -> Iterator[R]:
    """`work(chunk, *args)` of each chunk as a task of `client`, at most twice its threads in
    flight; results in input order."""
    window = max(2, 2 * sum(client.nthreads().values()))
    prefix = f"photoprep-{work.__name__.strip('_')}-{uuid.uuid4().hex[:8]}"
    pending: deque[Any] = deque()
    todo = iter(enumerate(chunks))

    def submit(index: int, chunk: Any) -> None:
        payload: Any = chunk
        if isinstance(chunk, np.ndarray) and chunk.nbytes > SCATTER_BYTES:
            payload = client.scatter(chunk, direct=True, hash=False)
        pending.append(client.submit(work, payload, *args, key=f"{prefix}-{index}", pure=False))

    try:
        for index, chunk in itertools.islice(todo, window):
            submit(index, chunk)
        while pending:
            result = pending.popleft().result()
            for index, chunk in itertools.islice(todo, 1):
                submit(index, chunk)
            yield result
    finally:
        if pending:
            client.cancel(list(pending))
            pending.clear()


def map_shared(
    work: Callable[..., R], items: Sequence[T], shared: Any, *args: Any, threads: int = 1
) -> list[R]:
    """`work(item, shared, *args)` of each item, in input order: as Dask tasks on the cluster of
    the `session` open in this process, `shared` sent to every worker once
    (`Client.scatter(broadcast=True)`), else in `threads` threads of this process, which share it.

    For steps of a stage's tables whose parts read one large array (the near search's keys read
    every hash): the results are the same either way. `work` must be a module-level function and
    should release the GIL for most of its time (numpy's sorts and array operations do)."""
    if not _OPEN:
        if threads <= 1 or len(items) <= 1:
            return [work(item, shared, *args) for item in items]
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(lambda item: work(item, shared, *args), items))
    client = next(iter(_OPEN.values()))
    [on_workers] = client.scatter([shared], broadcast=True, hash=False)
    try:
        return list(_tasks(client, work, items, (on_workers, *args)))
    finally:
        client.cancel([on_workers])


def imap_batches(
    work: Callable[..., R],
    items: Sequence[T],
    compute: ComputeParams,
    *args: Any,
    desc: str = "",
    unit: str = "img",
    local_first: bool = False,
) -> Generator[tuple[Sequence[T], R], None, None]:
    """Yield ``(batch, work(batch, *args))`` for consecutive batches of `items`, in input order.

    Each result is yielded as soon as it and every earlier one have come back from the workers,
    so a caller can write it out (or memoize it) before the next one arrives: nothing holds
    every result at once, and a killed run loses only the batches in flight. `work` must be a
    module-level function (Dask and joblib send it to other processes by name).

    ``local_first=True`` (work on this machine's CPU: decoding, resizing, features) runs the first
    batch in this process and, when the rest is short at its pace, the rest too, starting no
    worker; a fetch over the network, whose batches wait rather than compute, leaves it off.
    """
    if not len(items):
        return
    groups = batches(items, compute.batch_size)
    yield from imap_groups(work, groups, compute, *args, desc=desc, unit=unit, local_first=local_first)


class LazyGroups(Sequence[Any]):
    """`make(group)` of each of `groups`, made only when that group is asked for (a slice is
    another `LazyGroups`): what a task is sent is built a batch at a time, not all at once."""

    def __init__(self, make: Callable[[Any], Any], groups: Sequence[Any]) -> None:
        self.make = make
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return LazyGroups(self.make, self.groups[index])
        return self.make(self.groups[index])


def imap_groups(
    work: Callable[..., R],
    chunks: Sequence[S],
    compute: ComputeParams,
    *args: Any,
    desc: str = "",
    unit: str = "img",
    total: int | None = None,
    local_first: bool = False,
) -> Generator[tuple[S, R], None, None]:
    """`imap_batches` over batches the caller cut (`chunks`: the rows missing from each chunk of
    an output, say), each one task, in order. A lazy sequence is read a batch at a time; give
    its `total` items for the progress bar. `local_first`: see `_here_while_short`."""
    if not len(chunks):
        return
    total = total if total is not None else sum(len(c) for c in chunks)
    bar = Progress(total, desc or "work", unit=unit)
    results: Iterator[R] = iter(())
    try:
        if compute.backend == "dask":
            results = _on_dask(work, chunks, compute, args)
        elif compute.n_jobs == 1 or len(chunks) == 1:
            results = (work(chunk, *args) for chunk in chunks)
        elif local_first and not _threaded(work):  # a thread starts in no time
            results = _here_while_short(work, chunks, compute, args, total)
        else:
            results = _on_joblib(work, chunks, compute, args)
        for chunk, result in zip(chunks, results, strict=True):
            bar.update(len(chunk))
            yield chunk, result
    finally:
        # A caller that stops early (or fails) ends the workers' batches now, not at garbage collection.
        close = getattr(results, "close", None)
        if close is not None:
            with warnings.catch_warnings():
                # joblib counts the batches it ran or dropped for nothing: the caller stopped on
                # purpose (a full disk, Ctrl-C) and says so in its own line.
                warnings.filterwarnings("ignore", message=_EARLY_EXIT, category=UserWarning)
                close()
        bar.close()


def in_threads(work: W) -> W:
    """Mark `work` to run in ``compute.n_jobs`` threads of this process, not in worker processes,
    under the joblib backend: work that spends its time in numpy or OpenCV calls that release
    the GIL (see the module's notes)."""
    setattr(work, _IN_THREADS, True)
    return work


def release_workers() -> None:
    """End joblib's idle worker processes now. loky keeps them (about 100 MB each) for the next
    batch; a stage whose next steps are tables, in its own process, ends them first, so its peak
    is not the tables plus workers that wait. A later batch starts new ones. Nothing to do when
    no batch ran in worker processes (none to end) or under Dask (a `session` closes its cluster)."""
    if not _PROCESS_WORKERS:
        return
    _PROCESS_WORKERS.clear()
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(reuse=True).shutdown(wait=True)  # the executor joblib ran, not a new one


def _threaded(work: Callable[..., Any]) -> bool:
    return bool(getattr(work, _IN_THREADS, False))


def _on_joblib(
    work: Callable[..., R], chunks: Sequence[S], compute: ComputeParams, args: tuple[Any, ...]
) -> Iterator[R]:
    """`work(chunk, *args)` of each chunk in joblib's workers (threads for `in_threads` work,
    else processes), results in input order."""
    # Imported here: a re-run whose batches all come from the memo never starts workers, and
    # joblib (with loky) is a tenth of a second of every stage's start.
    from joblib import Parallel, delayed

    prefer = "threads" if _threaded(work) else None
    if prefer is None:
        _PROCESS_WORKERS[:] = [True]
    runner = Parallel(n_jobs=compute.n_jobs, return_as="generator", batch_size=1, prefer=prefer)
    yield from runner(delayed(work)(c, *args) for c in chunks)


def _here_while_short(
    work: Callable[..., R],
    chunks: Sequence[S],
    compute: ComputeParams,
    args: tuple[Any, ...],
    total: int,
) -> Iterator[R]:
    """The first chunk in this process, timed; the rest here too when, at that pace, they take
    less wall than the workers would spend starting (`WORKER_START_S` each), else in joblib's
    workers. So the few new photos of an increment cost no worker starts, and a large run loses
    at most one batch's head start. Only where the work runs depends on the clock: the results
    are the same either way (the same function on the same rows, as with ``n_jobs: 1``).
    """
    started = time.perf_counter()
    first = chunks[0]
    yield work(first, *args)
    rest = chunks[1:]
    per_item = (time.perf_counter() - started) / max(1, len(first))
    # The rest's items from the total (`total`), not by building every lazy chunk to count it.
    if per_item * (total - len(first)) <= WORKER_START_S * _local_workers(compute):
        for chunk in rest:
            yield work(chunk, *args)
        return
    yield from _on_joblib(work, rest, compute, args)


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
