"""Starting the ranks of a distributed training run (torch-free: the launching process never loads torch).

With ``train.nproc: N > 1`` the train stage, when it is not a rank already (:func:`must_launch`),
runs ``python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node N stages/train.py``
(:func:`launch`: torchrun's rendezvous on a free port of localhost) and waits; every rank runs
the same stage script. Under an external torchrun (``RANK`` and ``WORLD_SIZE`` set) the script
is a rank already. What a rank does is :mod:`photoprep.learn.distributed`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from photoprep.core.errors import UserError

__all__ = ["env_rank", "launch", "must_launch"]


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher (torchrun) started this process, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, size, int(os.environ.get("LOCAL_RANK", rank))


def must_launch(nproc: int) -> bool:
    """Whether the train stage must start ``nproc`` ranks itself (it is not a rank already)."""
    return nproc > 1 and env_rank() is None


# torchrun, with its report of a failed rank cut to one line (each rank prints its own error).
# Inline: importing photoprep here would pin the CPU math of the ranks' parent again.
_TORCHRUN = """
import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as exc:
    rank, failure = exc.get_first_failure()
    print(f"photoprep: training rank {rank} failed first (exit code {failure.exitcode})", file=sys.stderr)
    sys.exit(1)
except SignalException as exc:  # stopped (SIGTERM from the stage): the ranks are stopped already
    sys.exit(128 + int(exc.sigval))
"""


def launch(nproc: int, script: str | Path, args: Sequence[str] = ()) -> None:
    """Run ``script`` as ``nproc`` ranks on this machine (torchrun, standalone) and wait.

    A failed rank makes torchrun stop the others; then one UserError. When this process is
    interrupted, torchrun gets SIGTERM and passes it on to its ranks before this returns.
    """
    command = [
        sys.executable,
        "-c",
        _TORCHRUN,
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        str(script),
        *args,
    ]
    proc = subprocess.Popen(command)
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if code != 0:
        raise UserError(f"train.nproc={nproc}: a training rank failed, the others were stopped (exit {code})")
