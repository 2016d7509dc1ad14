"""CPU math pinned before the libraries load: the same bytes on any x86-64 CPU with AVX2, Intel or
AMD, AVX-512 or not (``compute.cpu_math: portable``, the default).

What a math library computes can depend on the CPU it runs on, because each picks code per
CPU: ATen (torch's own kernels) by the widest vector ISA it finds, oneDNN (convolutions) by its
own ISA probe, MKL (matrix products, and the vector maths behind ``torch.sqrt``, ``exp``, ...)
by vendor and ISA, OpenBLAS (numpy's and scipy's matrix products: k-means, t-SNE's PCA) by its
core type, numpy's own loops (``exp``, ``log``, ``power``) by ISA, and every one of them splits
reductions by the number of threads. A model trained on one machine then differs in the last
bits from one trained on another, and training amplifies the difference into other weights and
other metrics. :func:`pin_cpu_math` fixes every such choice before the libraries load:

============================  ========================  ==============================================
setting                       portable value            what it pins
============================  ========================  ==============================================
``ATEN_CPU_CAPABILITY``       ``avx2``                  ATen's vectorised kernels (not AVX-512)
``ONEDNN_MAX_CPU_ISA``        ``AVX2``                  oneDNN's convolution kernels
``MKL_CBWR``                  ``COMPATIBLE,STRICT``     MKL's code branch: the one branch that gives
                                                        the same bits on AMD as on Intel (``AVX2``
                                                        falls back to MKL's AUTO on AMD), and a
                                                        summation order that does not depend on the
                                                        thread count
``MKL_DYNAMIC``               ``FALSE``                 MKL uses the threads asked for
``OPENBLAS_CORETYPE``         ``Haswell``               numpy's and scipy's OpenBLAS kernels
``NPY_DISABLE_CPU_FEATURES``  the AVX-512 targets       numpy's AVX-512 loops (``exp``, ``log``, ...)
``OMP/MKL/OPENBLAS_NUM_       ``threads``               the thread count, hence every reduction's
THREADS``                                               order
============================  ========================  ==============================================

plus ``torch.set_num_threads(threads)`` once torch is loaded. Two choices are made in the code,
not here, because no setting reaches them: Adam and AdamW run ``fused`` on the CPU
(:func:`cpu_optimizer_options`; the unfused step takes ``torch.sqrt``, whose MKL vector-math
kernel uses the CPU's approximate reciprocal square root, and Intel and AMD approximate it
differently), and distances are rooted in numpy, not with ``torch.sqrt``.

oneDNN stays in the math, capped at AVX2: its documentation promises the same bits on one
platform only, so this module does not rest on a promise but on a check. ``tests/test_emulated_cpus.py``
runs a few training steps of the demo's convnet and of a timm backbone, DEC, k-means and
t-SNE natively and under emulated Intel (Haswell) and AMD (EPYC-Rome) CPUs (qemu-user, whose
approximate-reciprocal instructions are exact: any kernel that uses them shows up as a
difference) and compares the bytes. Turning oneDNN off costs 2.6x the training time of the
demo's convnet and changed nothing the check could see.

``compute.cpu_math`` (:data:`MODES`):

``portable``
    everything above: the same bytes on any x86-64 CPU with AVX2, whatever its vendor.
``vendor``
    the same but ``MKL_CBWR=AVX2,STRICT``: Intel's AVX2 kernels on Intel CPUs, MKL's own on AMD
    ones; matrix products run 3-4x faster than on the COMPATIBLE branch (DEC's dense layers,
    k-means), and the bytes are the same on CPUs of the vendor that made them only.
``native``
    the libraries choose (fastest on wide CPUs; the same bytes on the machine that made them
    only; MKL's summation order is still fixed).

In the pinned modes these values replace whatever the environment says; :func:`describe`
records what was in force, with the CPU model, in the stage's performance report. The libraries
read them when they load, so :func:`pin_cpu_math` must run before numpy and torch are imported;
what was loaded before is recorded (``loaded_before_pinning``) and the stages are tested to
have none. On CUDA, ``train.deterministic`` is what counts; these settings do not touch the GPU.

Set once per process: a second call with other arguments raises.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = [
    "MODES",
    "PORTABLE_ENV",
    "THREAD_ENV",
    "apply_threads",
    "blas_without_threads",
    "cpu_model",
    "cpu_optimizer_options",
    "describe",
    "pin_cpu_math",
    "pin_default",
    "pinned",
    "processes_here",
    "settings",
]

# numpy's dispatch targets above AVX2, under the names of numpy 2.x (X86_V4, AVX512_*) and 1.x
# (AVX512F, AVX512_SKX, ...); numpy ignores the names it does not know.
_NUMPY_AVX512 = "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL"

PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": _NUMPY_AVX512,
}
# MKL's AVX2 branch: Intel's AVX2 kernels on Intel, MKL's own (AUTO) on AMD: the same bytes per vendor.
VENDOR_ENV = PORTABLE_ENV | {"MKL_CBWR": "AVX2,STRICT"}
# Even when native: a fixed summation order on one machine (MKL varied run to run on 2 cores).
REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE"}
MODES = {"portable": PORTABLE_ENV, "vendor": VENDOR_ENV, "native": REPRODUCIBLE_ENV}
# What each mode promises, as verify and the docs say it.
PROMISES = {
    "portable": "the same bytes on any x86-64 CPU with AVX2, Intel or AMD",
    "vendor": "the same bytes on x86-64 CPUs with AVX2 of the vendor that made them",
    "native": "the same bytes on the machine that made them",
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Libraries that read the settings above when they load.
_READERS = ("numpy", "torch", "scipy", "sklearn")

_pinned: dict[str, Any] | None = None


def pin_cpu_math(mode: str = "portable", threads: int = 2) -> dict[str, Any]:
    """Pin the CPU math libraries' choices for ``mode`` (:data:`MODES`; see the module docstring);
    call before numpy and torch load.

    Idempotent for the same arguments; a second call with others raises, since the libraries
    have read the first settings already. Returns what :func:`pinned` will return.
    """
    global _pinned
    if mode not in MODES:
        raise ValueError(f"CPU math mode {mode!r} is none of {', '.join(MODES)}")
    wanted = {"mode": mode, "threads": int(threads)}
    if _pinned is not None:
        if {k: _pinned[k] for k in wanted} != wanted:
            raise RuntimeError(
                f"CPU math already pinned as {_pinned}; cannot change it to {wanted} in one process"
            )
        return dict(_pinned)
    if mode != "native":  # forced: a stray setting in the environment must not undo the promise
        os.environ.update(MODES[mode])
        os.environ.update(dict.fromkeys(THREAD_ENV, str(threads)))
    else:
        for key, value in REPRODUCIBLE_ENV.items():
            os.environ.setdefault(key, value)
        for key in THREAD_ENV:
            os.environ.setdefault(key, str(threads))
    _pinned = {**wanted, "loaded_before_pinning": [name for name in _READERS if name in sys.modules]}
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


def cpu_optimizer_options(device_type: str) -> dict[str, Any]:
    """Keyword arguments for torch's Adam and AdamW on ``device_type``: ``fused`` on the CPU.

    The unfused step divides by ``torch.sqrt`` of the second moment, which MKL's vector maths
    computes from the CPU's approximate reciprocal square root: Intel and AMD round it
    differently, and the weights part in the first step. The fused CPU kernel takes the exact
    square root. On CUDA the fused kernel is also the fastest.
    """
    return {"fused": True} if device_type in ("cpu", "cuda") else {}


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
        "mode": _pinned["mode"] if _pinned else None,
        "threads": torch.get_num_threads(),
        "env": {key: os.environ.get(key) for key in env_keys},
    }


def blas_without_threads() -> None:
    """For a stage that does no matrix maths (the download): numpy's OpenBLAS starts no thread
    pool when numpy loads, unless the environment sets its size. Starting one thread per core
    took about 80 ms of the download's start on a 2-core AMD EPYC, all of it before the first
    request. Call before numpy loads; it changes no byte the stage writes."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pin_default() -> None:
    """Pin the portable mode unless something pinned already (a stage pins from its params first;
    a test or a notebook that imports photoprep.learn gets this)."""
    if _pinned is None:
        pin_cpu_math()


def describe() -> dict[str, Any]:
    """What the CPU math ran with: pinned settings, ATen's capability in use, threads, CPU model,
    and the libraries that had loaded before the pinning (their choices may not be pinned)."""
    import torch

    return {
        **settings(),
        "cpu": cpu_model(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loaded_before_pinning": list((_pinned or {}).get("loaded_before_pinning", [])),
    }
