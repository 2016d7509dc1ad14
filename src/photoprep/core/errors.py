"""Errors a user can act on, and how a stage turns them into one line.

A :class:`UserError` is a problem with what the user gave (params, a manifest, a path): it is
printed as one line on stderr, without a traceback, and the stage exits 1. A bad *record* is
never an exception: it becomes a row with a reason (see the funnel).

`run_stage` also prints each stage's summary line (what its ``main`` returns, and the time),
turns SIGTERM into the same clean stop as Ctrl-C, and ends an interrupted stage with one line
(exit 130) instead of a traceback. A stage that keeps partial work says how much in an
:class:`Interrupted`.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Interrupted", "UserError", "describe_validation_error", "run_stage", "stage_name"]

INTERRUPTED_EXIT = 130


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback, exit code 1."""


class Interrupted(UserError):
    """A stage stopped by Ctrl-C or SIGTERM; the message says what was kept. Exit code 130."""


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
    if summary:
        print(f"{stage}: {summary} in {time.monotonic() - start:.1f} s", flush=True)
