"""Give freed memory back to the operating system between a stage's steps.

A stage reads a table, transforms it, writes it, and moves on; the copies it made are freed,
but the allocators keep the pages for reuse: glibc's malloc (numpy, pandas' Python objects) and
Arrow's mimalloc pool (pandas' Arrow-backed strings, parquet reads). Those pages count in the
stage's resident anonymous memory, and the next step's working set lands on top of them, so the
peak grows with every transient copy of every table that came before. `release` hands the free
pages back: the stage's peak is then its largest single step, not the sum of its steps' garbage.
It frees nothing that is in use, costs a few milliseconds, and changes no result.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    return trim


def release() -> None:
    """Return the free pages of Arrow's memory pool and of glibc's heap to the operating system."""
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
