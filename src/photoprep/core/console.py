"""What a stage says while it runs: progress, and a clear stop when it has nothing to work on.

- Progress: a tqdm bar when stderr is a terminal; otherwise (a log file, CI, ``nohup``) a plain
  line through the `logging` module at most every `PROGRESS_EVERY_S` seconds, so a log shows
  that long work moves without filling up with bars. ``PHOTOPREP_QUIET=1`` silences progress;
  summaries and errors still print.
- The summary line of each stage is printed by `photoprep.core.errors.run_stage` from what the
  stage's ``main`` returns.
- `require_input` stops a stage that received no image with one line naming the cause upstream
  and the report to read, instead of a traceback from deep inside pandas or numpy.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

from photoprep.core.errors import UserError

__all__ = ["PROGRESS_EVERY_S", "QUIET_ENV", "Progress", "count", "note", "quiet", "reasons", "require_input"]

QUIET_ENV = "PHOTOPREP_QUIET"
PROGRESS_EVERY_S = 10.0

_log = logging.getLogger("photoprep.progress")


def quiet() -> bool:
    """True when PHOTOPREP_QUIET is set to anything but '', '0' or 'false'."""
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def count(n: int) -> str:
    """A count as people read it: 142,459."""
    return f"{n:,}"


def reasons(values: Iterable[object] | Mapping[str, int], top: int = 3) -> str:
    """The most common reasons with their counts: 'connect_error 2,000, http_404 3' ('' when none);
    `values` are the reasons, or a mapping of reason to count."""
    counted = Counter(values) if isinstance(values, Mapping) else Counter(str(v) for v in values)
    return ", ".join(
        f"{reason} {count(n)}" for reason, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test or a wrapper may swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _logger() -> logging.Logger:
    if not _log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False
    return _log


def note(line: str) -> None:
    """One line on stderr about how the stage runs (where its work went); silenced by PHOTOPREP_QUIET."""
    if not quiet():
        _logger().info(line)


class Progress:
    """Progress of `total` items: a tqdm bar on a terminal, a line every 10 s elsewhere, or nothing.

    `enabled=False` (or PHOTOPREP_QUIET) shows nothing. Use as a context manager or call `close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", enabled: bool = True):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar: tqdm | None = None
        self.lines = enabled and not quiet() and total > 0
        if self.lines and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, file=sys.stderr)
            self.lines = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            now = time.monotonic()
            if now - self.last_line >= PROGRESS_EVERY_S:
                self.last_line = now
                _logger().info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """'fetch demo: 1,200 of 5,000 img (24%), 31 s'."""
        now = time.monotonic() if now is None else now
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.desc}: {count(self.done)} of {count(self.total)} {self.unit}{share}, "
            f"{now - self.start:.0f} s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.lines = False


def require_input(n: int, stage: str, cause: str, see: str | Path) -> None:
    """Stop `stage` with one line when it received no image: the cause upstream and the report to read."""
    if n > 0:
        return
    where = see.as_posix() if isinstance(see, Path) else see
    raise UserError(f"{stage}: no image to work on: {cause}; see {where}")
