"""Portable CPU math: torch gives the same bytes on any x86-64 CPU with AVX2.

What a math library computes can depend on the CPU it runs on, because each picks code per
CPU: ATen (torch's own kernels) by the widest vector ISA it finds, oneDNN (convolutions) by
its own ISA probe, MKL (matrix products) by vendor and ISA, and every one of them splits
reductions by the number of threads. A model trained on an AVX-512 machine then differs in
the last bits from one trained on an AVX2 machine, and training amplifies the difference into
other weights and other metrics. :func:`pin_cpu_math` fixes every such choice to what any
AVX2 machine has, before torch loads:

==========================  ===============  =====================================================
setting                     portable value   what it pins
==========================  ===============  =====================================================
``ATEN_CPU_CAPABILITY``     ``avx2``         ATen's vectorised kernels (not AVX-512 where present)
``ONEDNN_MAX_CPU_ISA``      ``AVX2``         oneDNN's convolution and matmul kernels
``MKL_CBWR``                ``AVX2,STRICT``  MKL's code branch, and a summation order that does
                                             not depend on the thread count (conditional
                                             numerical reproducibility)
``MKL_DYNAMIC``             ``FALSE``        MKL uses the threads asked for, even on a busy box
``MKL/OMP_NUM_THREADS``     ``threads``      the thread count, hence every reduction's order
==========================  ===============  =====================================================

plus ``torch.set_num_threads(threads)`` once torch is loaded. In portable mode these values
replace whatever the environment says; :func:`describe` records what was in force, with the
CPU model, in the model's metadata. ``compute.portable: false`` leaves every choice to the
libraries (faster on wide CPUs, reproducible on one machine only). On CUDA,
``train.deterministic`` is what counts; these settings do not touch the GPU.

Set once per process: a library reads its setting when it first runs, so a later change would
not take effect (:func:`pin_cpu_math` refuses to change what was pinned).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = [
    "PORTABLE_ENV",
    "apply_threads",
    "cpu_model",
    "describe",
    "pin_cpu_math",
    "pin_default",
    "pinned",
    "processes_here",
    "settings",
]

PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_DYNAMIC": "FALSE",
}
# Even when not portable: a fixed summation order on one machine (MKL varied run to run on 2 cores).
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_pinned: dict[str, Any] | None = None


def pin_cpu_math(portable: bool = True, threads: int = 2) -> dict[str, Any]:
    """Pin the CPU math libraries' choices (see the module docstring); call before torch loads.

    Idempotent for the same arguments; a second call with others raises, since the libraries
    have read the first settings already. Returns what :func:`describe` will record.
    """
    global _pinned
    wanted = {"portable": bool(portable), "threads": int(threads)}
    if _pinned is not None:
        if {k: _pinned[k] for k in wanted} != wanted:
            raise RuntimeError(
                f"CPU math already pinned as {_pinned}; cannot change it to {wanted} in one process"
            )
        return dict(_pinned)
    if portable:  # forced: a stray setting in the environment must not undo the promise
        os.environ.update(PORTABLE_ENV)
        os.environ.update(dict.fromkeys(THREAD_ENV, str(threads)))
    else:
        for key, value in REPRODUCIBLE_ENV.items():
            os.environ.setdefault(key, value)
        for key in THREAD_ENV:
            os.environ.setdefault(key, str(threads))
    _pinned = {**wanted, "torch_loaded_before": "torch" in sys.modules}
    if "torch" in sys.modules:  # the thread count can still be set; the ISA choices may be late
        _set_torch_threads(threads)
    return dict(_pinned)


def _set_torch_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def processes_here(nproc: int = 1) -> int:
    """How many processes of one job share this machine's cores: torchrun's ``LOCAL_WORLD_SIZE``
    when a launcher started this process, else ``nproc`` (what the stage is about to launch).
    A rank pins ``compute.threads // processes_here()`` threads (at least one)."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE")
    return max(1, int(local)) if local and local.isdigit() else max(1, nproc)


def pinned() -> dict[str, Any] | None:
    """What :func:`pin_cpu_math` set in this process, or None."""
    return dict(_pinned) if _pinned is not None else None


def apply_threads() -> None:
    """Set torch's thread count to the pinned one (torch must be importable)."""
    if _pinned is not None:
        _set_torch_threads(_pinned["threads"])


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings() -> dict[str, Any]:
    """What the CPU math ran with, the same on every machine that pinned alike (no CPU model):
    for the model files, whose bytes must not depend on the machine."""
    import torch

    env_keys = sorted({*PORTABLE_ENV, *REPRODUCIBLE_ENV, *THREAD_ENV})
    return {
        "portable": bool(_pinned and _pinned["portable"]),
        "threads": torch.get_num_threads(),
        "env": {key: os.environ.get(key) for key in env_keys},
    }


def pin_default() -> None:
    """Pin the portable defaults unless something pinned already (a stage pins from its params
    first; a test or a notebook that imports photoprep.learn gets these)."""
    if _pinned is None:
        pin_cpu_math()


def describe() -> dict[str, Any]:
    """What the CPU math ran with: pinned settings, ATen's capability in use, threads, CPU model."""
    import torch

    return {
        **settings(),
        "cpu": cpu_model(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
