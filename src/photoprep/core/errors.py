"""Errors a user can act on, and how a stage turns them into one line.

A :class:`UserError` is a problem with what the user gave (params, a manifest, a path): it is
printed as one line on stderr, without a traceback, and the stage exits 1. A bad *record* is
never an exception: it becomes a row with a reason (see the funnel).

`run_stage` also prints each stage's summary line (what its ``main`` returns, and the time),
turns SIGTERM into the same clean stop as Ctrl-C, and ends an interrupted stage with one line
(exit 130) instead of a traceback. A stage that keeps partial work says how much in an
:class:`Interrupted`.

`run_stage` also keeps the garbage collector off what a stage imported: the objects of its modules
(pandas, Arrow, aiohttp: about 90,000) live as long as the process, yet every full collection
walks them all (about 50 ms each on a 2-core AMD EPYC), and so do the interpreter's collections
at exit, several in a row. They are frozen (`gc.freeze`) while the stage's ``main`` runs, and
everything is frozen again at exit, when the process ends and its memory goes back whole. This
changes when the collector looks, never what a stage writes.

Storage faults a user can fix (`ACTIONABLE`: a full disk or quota, a read-only or forbidden
folder, a failing disk) are user errors too, wherever they happen: `run_stage` turns such an
OSError into one line naming the path, what the system said, how much space was needed where
known, what the stage kept, and what to do (`describe_storage_error`). Any other errno keeps its
traceback. Code near a write names the path and the bytes in a :class:`StorageError`
(`storage_path`), since many OS errors carry no file name (a write on a descriptor, Arrow's).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from photoprep.core.layout import CACHE_ENV, cache_root

__all__ = [
    "ACTIONABLE",
    "Interrupted",
    "StorageError",
    "UserError",
    "describe_storage_error",
    "describe_validation_error",
    "run_stage",
    "stage_name",
    "storage_path",
]

INTERRUPTED_EXIT = 130
# The errnos a user can act on: make room, make the folder writable or readable, look at the disk.
ACTIONABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO})


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback, exit code 1."""


class Interrupted(UserError):
    """A stage stopped by Ctrl-C or SIGTERM; the message says what was kept. Exit code 130."""


class StorageError(OSError):
    """An OS error a user can act on (`ACTIONABLE`) on a path the stage writes or reads.

    `needed`: the bytes the write needed, where known; `free`: the bytes free when a check found
    too few before anything was written (`checked`); `kept`: what the stage keeps for the re-run
    ("kept 1,024 of 2,000 ids ..."). The message is `describe_storage_error`'s line.
    """

    def __init__(
        self,
        code: int,
        path: str | os.PathLike[str],
        needed: int | None = None,
        *,
        free: int | None = None,
        kept: str = "",
        checked: bool = False,
    ) -> None:
        super().__init__(code, os.strerror(code), os.fspath(path))
        self.needed = needed
        self.free = free
        self.kept = kept
        self.checked = checked

    def __reduce__(self) -> tuple[Any, ...]:  # joblib and Dask send it back from a worker
        return (_storage_error, (self.errno, self.filename, self.needed, self.free, self.kept, self.checked))

    def __str__(self) -> str:
        return describe_storage_error(self) or super().__str__()

    def keeping(self, kept: str, path: str | os.PathLike[str] | None = None) -> StorageError:
        """The same error, saying what the stage keeps (and naming `path` instead, when given)."""
        where = self.filename if path is None else os.fspath(path)
        return _storage_error(self.errno, where, self.needed, self.free, kept, self.checked)


def _storage_error(*args: Any) -> StorageError:
    code, path, needed, free, kept, checked = args
    return StorageError(code, path, needed, free=free, kept=kept, checked=checked)


@contextlib.contextmanager
def storage_path(
    path: str | os.PathLike[str], needed: int | None = None, aliases: tuple[str, ...] = ()
) -> Iterator[None]:
    """Inside the block, an actionable OS error that names no file, or one of `aliases` (a
    temporary name of `path`), becomes a StorageError naming `path` and the bytes `needed`.

    An error that names another file keeps it; other errnos pass through unchanged.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        named = exc.filename is not None and os.fsdecode(exc.filename) not in aliases
        if exc.errno not in ACTIONABLE or named:
            raise
        raise StorageError(exc.errno, path, needed) from exc


def human_bytes(n: int) -> str:
    """A size as people read it: 512 B, 12.0 KiB, 3.4 MiB, 1.2 GiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _inside(path: str, folder: str | os.PathLike[str]) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _shown(path: str) -> str:
    """`path` relative to the working directory when it lies inside it, else absolute."""
    if _inside(path, os.getcwd()):
        return Path(os.path.relpath(path)).as_posix()
    return os.path.abspath(path)


_FIX = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space within your quota",
    errno.EROFS: "make it writable (remount it read-write)",
    errno.EACCES: "give this user access to it (owner and mode)",
    errno.EIO: "check the disk (dmesg, fsck)",
}


def _advice(code: int, path: str) -> str:
    """What to do about `code` on `path`: the fix, and where the files could go instead."""
    if code == errno.EIO:
        return _FIX[code]
    room = "a disk with room" if code in (errno.ENOSPC, errno.EDQUOT) else "a writable disk"
    if _inside(path, cache_root()):
        return f"{_FIX[code]} or set {CACHE_ENV} to a folder on {room}"
    if _shown(path).split("/")[0] == "data":
        return f"{_FIX[code]} or move data/ to {room}"
    return _FIX[code]


def describe_storage_error(exc: OSError) -> str | None:
    """The one line of an OS error a user can act on, or None for any other (it keeps its traceback).

    'data/raw/x: No space left on device (ENOSPC; needs 2.8 MiB); kept 1,024 of 2,000 ids (...):
    free space there or move data/ to a disk with room, then run it again to resume'.
    """
    code = exc.errno
    if code not in ACTIONABLE:
        return None
    needed, free = getattr(exc, "needed", None), getattr(exc, "free", None)
    figures = [errno.errorcode[code]]
    figures += [f"needs {human_bytes(needed)}"] if needed is not None else []
    figures += [f"{human_bytes(free)} free"] if free is not None else []
    meaning = "not enough free space to start" if getattr(exc, "checked", False) else os.strerror(code)
    kept = getattr(exc, "kept", "")
    if exc.filename is None:
        advice = _FIX[code] if code == errno.EIO else "see which disk is full or read-only (df -h)"
        line = f"{meaning} ({', '.join(figures)})"
    else:
        path = os.fsdecode(exc.filename)
        line, advice = f"{_shown(path)}: {meaning} ({', '.join(figures)})", _advice(code, path)
    if kept:
        line += f"; {kept}"
    resume = kept and not getattr(exc, "checked", False)
    return f"{line}: {advice}, then run it again" + (" to resume" if resume else "")


def describe_validation_error(error: Mapping[str, Any]) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as 'key.path: message (got value)'."""
    loc = ".".join("validate" if part == "validate_" else str(part) for part in error["loc"])
    msg = error["msg"]
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    ctx = error.get("ctx") or {}
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            msg = f"must be {word} {ctx[bound]}"
    if kind == "literal_error" and "expected" in ctx:
        msg = f"must be one of {ctx['expected']}"
    msg = msg.removeprefix("Value error, ")
    field, sep, rest = msg.partition(": ")
    if sep and field.isidentifier() and kind == "value_error":  # a section's cross-field check names its key
        loc, msg = f"{loc}.{field}" if loc else field, rest
    got = error.get("input")
    if "(got" not in msg and not isinstance(got, dict):
        msg = f"{msg} (got {got!r})"
    return f"{loc}: {msg}" if loc else msg


def stage_name(argv: list[str] | None = None) -> str:
    """The DVC name of the running stage script: 'dedup', or 'download@heobs' for a foreach item."""
    argv = sys.argv if argv is None else argv
    name = Path(argv[0]).stem if argv and argv[0] else "photoprep"
    return f"{name}@{argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else name


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@functools.cache
def _freeze_at_exit() -> None:
    """At exit, before the interpreter's own collections: they would walk every object only to
    free memory that goes back with the process (handlers registered later run first)."""
    atexit.register(gc.freeze)


def run_stage(main: Callable[[], str | None], name: str | None = None) -> None:
    """Run a stage entry point; print its summary line, or its user error as one line.

    ``main`` returns one line of counts ('2,000 ids: 1,990 fetched, 10 failed (http_404 10)'),
    printed on stdout as '<stage>: <summary> in <seconds> s', or None. A UserError prints
    'photoprep: <message>' on stderr and exits 1; Ctrl-C or SIGTERM exits 130 with one line.
    """
    stage = name or stage_name()
    start = time.monotonic()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    _freeze_at_exit()
    gc.freeze()  # what the imports made: no collection during `main` needs to walk it
    try:
        summary = main()
    except Interrupted as exc:
        print(f"photoprep: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except UserError as exc:
        print(f"photoprep: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"photoprep: {stage}: interrupted; nothing written, run it again", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except OSError as exc:
        line = describe_storage_error(exc)
        if line is None:
            raise  # not one a user can act on: its traceback says where to look
        print(f"photoprep: {stage}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        gc.unfreeze()  # collectable again: a stage run in-process (the tests) leaves no garbage pinned
    if summary:
        print(f"{stage}: {summary} in {time.monotonic() - start:.1f} s", flush=True)
