"""parallel.imap_batches on joblib: where the batches run (the Dask backend: tests/test_dask.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from photoprep.core import parallel
from photoprep.core.params import ComputeParams

ITEMS = list(range(8))


def pid_and_sum(batch: list[int]) -> tuple[int, int]:
    """The process that ran the batch, and a result that says which batch it was."""
    time.sleep(0.001 * len(batch))
    return os.getpid(), sum(batch)


def _run(local_first: bool) -> tuple[list[int], list[int]]:
    compute = ComputeParams(n_jobs=2, batch_size=2)
    out = list(parallel.imap_batches(pid_and_sum, ITEMS, compute, local_first=local_first))
    assert [list(batch) for batch, _ in out] == [ITEMS[i : i + 2] for i in range(0, len(ITEMS), 2)]
    return [pid for _, (pid, _) in out], [total for _, (_, total) in out]


def test_a_short_run_stays_in_this_process_and_starts_no_worker():
    pids, sums = _run(local_first=True)
    assert sums == [1, 5, 9, 13]
    assert set(pids) == {os.getpid()}


def test_a_long_run_goes_to_the_workers_after_its_first_batch(monkeypatch: pytest.MonkeyPatch):
    # Workers that cost nothing to start: any rest is longer than their start.
    monkeypatch.setattr(parallel, "WORKER_START_S", 0.0)
    pids, sums = _run(local_first=True)
    assert sums == [1, 5, 9, 13]
    assert pids[0] == os.getpid()
    assert os.getpid() not in pids[1:]


def test_without_local_first_every_batch_goes_to_the_workers():
    pids, sums = _run(local_first=False)
    assert sums == [1, 5, 9, 13]
    assert os.getpid() not in pids


@parallel.in_threads
def thread_and_sum(batch: list[int]) -> tuple[int, int, int]:
    """The process and thread that ran the batch, and which batch it was."""
    time.sleep(0.01)  # long enough that both threads take a batch
    return os.getpid(), threading.get_ident(), sum(batch)


def test_work_marked_in_threads_runs_in_threads_of_this_process_in_order():
    compute = ComputeParams(n_jobs=2, batch_size=2)
    out = list(parallel.imap_batches(thread_and_sum, ITEMS, compute, local_first=True))
    assert [list(batch) for batch, _ in out] == [ITEMS[i : i + 2] for i in range(0, len(ITEMS), 2)]
    assert [total for _, (_, _, total) in out] == [1, 5, 9, 13]
    assert {pid for _, (pid, _, _) in out} == {os.getpid()}
    assert threading.get_ident() not in {thread for _, (_, thread, _) in out}


def test_release_workers_ends_the_workers_that_ran_and_a_later_run_starts_new_ones():
    first, _ = _run(local_first=False)
    assert set(first) & _alive(first)  # loky keeps its workers for the next batches
    parallel.release_workers()
    assert not _alive(first)
    again, sums = _run(local_first=False)
    assert sums == [1, 5, 9, 13]
    assert not set(again) & set(first)
    parallel.release_workers()
    parallel.release_workers()  # none left to end: nothing happens
    assert not _alive(again)


def test_release_workers_starts_nothing_when_no_worker_ran():
    parallel.release_workers()  # loky may be loaded (joblib is): no executor is made to be ended
    psutil = pytest.importorskip("psutil")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    parallel.release_workers()
    assert {child.pid for child in psutil.Process().children(recursive=True)} == before


def _alive(pids: list[int]) -> set[int]:
    """Which of `pids` are still running."""
    alive = set()
    for pid in set(pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.add(pid)
    return alive
