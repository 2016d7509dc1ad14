"""Give freed memory back to the operating system between a stage's steps.

A stage reads a table, transforms it, writes it, and moves on; the copies it made are freed,
but the allocators keep the pages for reuse: glibc's malloc (numpy, pandas' Python objects) and
Arrow's mimalloc pool (pandas' Arrow-backed strings, parquet reads). Those pages count in the
stage's resident anonymous memory, and the next step's working set lands on top of them, so the
peak grows with every transient copy of every table that came before. `release` hands the free
pages back: the stage's peak is then its largest single step, not the sum of its steps' garbage.
It frees nothing that is in use, costs a few milliseconds, and changes no result.

`arrow_from_malloc`, called by the data stages before pyarrow loads, puts Arrow's buffers in the C
library's malloc instead of Arrow's default mimalloc pool, which kept about two and a half times
the bytes Arrow held resident and gave little back (reading the 20,200 rows of a dedup table,
14 MB of Arrow buffers: 38 MB more RssAnon with mimalloc, 14 with malloc, which `release` trims).
Arrow reads the choice (``ARROW_DEFAULT_MEMORY_POOL``) once, when it loads, so it is an
environment variable set first thing; the workers a stage starts inherit it. The bytes written
do not depend on the allocator.

`map_large_blocks`, called by the download stage, has glibc map every block of a page or more
on its own (``mallopt(M_MMAP_THRESHOLD)``) instead of carving it from its heaps. The download
allocates a body of 10 to 100 KB for every photo on one thread and frees it on another; in the
heaps their holes stayed resident between longer-lived blocks and grew with the run (from
2,000 to 20,000 photos read from files: 13 MB more than when each body had a mapping of its
own). A mapped block goes back to the system when it is freed.
"""

from __future__ import annotations

import ctypes
import os
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


def arrow_from_malloc() -> None:
    """Arrow's buffers from malloc in this process and the ones it starts, unless the environment
    chose a pool already. Call before pyarrow loads: afterwards it changes nothing here."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def map_large_blocks(threshold: int = 4096) -> None:
    """Blocks of `threshold` bytes or more get a mapping of their own in this process (glibc;
    elsewhere nothing changes). See the module's notes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc
        return


def release() -> None:
    """Return the free pages of Arrow's memory pool and of glibc's heap to the operating system."""
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
