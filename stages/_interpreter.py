"""Run a stage with the project's Python, whichever `python` DVC found first.

dvc.yaml's commands call `python`. When that is not an interpreter with photoprep installed
(DVC started as `.venv/bin/dvc` without activating the venv, say), the stage re-runs itself
with the project's `.venv/bin/python`; without one it stops with one line saying what to do.
Standard library only: it runs before anything of photoprep can be imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RERUN = "PHOTOPREP_STAGE_REEXEC"


def ensure_project_python() -> None:
    if importlib.util.find_spec("photoprep") is not None and importlib.util.find_spec("pandas") is not None:
        return
    venv_python = ROOT / ".venv" / "bin" / "python"
    # A venv's python is a link to the base interpreter: compare the paths, not their targets,
    # and re-run once at most.
    if venv_python.exists() and not os.environ.get(_RERUN):
        os.environ[_RERUN] = "1"
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    print(
        f"photoprep: {Path(sys.argv[0]).name} was started by {sys.executable}, which does not have photoprep "
        "installed: run `make install` and `source .venv/bin/activate`, or `pip install -e .` here",
        file=sys.stderr,
    )
    raise SystemExit(1)
