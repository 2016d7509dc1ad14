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

`map_large_blocks`, called by the download stage when its source reads files, has glibc map
every block of a page or more on its own (``mallopt(M_MMAP_THRESHOLD)``) instead of carving it
from its heaps. Such a download reads a body of 10 to 100 KB for every photo on a reader thread
and frees it on the sink's; in the heaps their holes stayed resident and grew with the run (from
2,000 to 20,000 photos: 13 MB more than with a mapping each). A mapped block goes back to the
system when it is freed. Not over HTTP: there every read of the socket is a block too, and
mapping each cost 29 % more CPU (20,000 photos at 50 ms: 12.5 CPU s against 9.7) for 10 MB.
The bucket stage maps blocks of 128 KB or more (glibc's default threshold, which glibc would
otherwise raise to the size of each mapped block freed): its threads decode each photo to a
frame of a few hundred KB and return a batch of pixels of some MB, whose holes stayed in the
heaps, one a thread. From 2,000 to 20,200 photos its peak grew 0.54 KB a photo against 0.80,
in the same wall (medians of two, this 2-core AMD).
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `malloc_trim` and `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    glibc = hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")  # musl has no malloc_trim
    return libc if glibc else None


def arrow_from_malloc() -> None:
    """Arrow's buffers from malloc in this process and the ones it starts, unless the environment
    chose a pool already. Call before pyarrow loads: afterwards it changes nothing here."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def map_large_blocks(threshold: int = 4096) -> None:
    """Blocks of `threshold` bytes or more get a mapping of their own in this process (glibc;
    elsewhere nothing changes). See the module's notes."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def release() -> None:
    """Return the free pages of Arrow's memory pool and of glibc's heap to the operating system."""
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
