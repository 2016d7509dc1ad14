"""Errors a user can act on, and how a stage turns them into one line.

A :class:`UserError` is a problem with what the user gave (params, a manifest, a path): it is
printed as one line on stderr, without a traceback, and the stage exits 1. A bad *record* is
never an exception: it becomes a row with a reason (see the funnel).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["UserError", "describe_validation_error", "run_stage"]


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback, exit code 1."""


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


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage entry point: user errors become one line on stderr and exit code 1."""
    try:
        main()
    except UserError as exc:
        print(f"photoprep: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
