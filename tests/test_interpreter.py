"""A stage started by an interpreter without photoprep (DVC found another `python` first)
re-runs itself with the project's .venv, or says in one line what to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, with_venv: bool) -> Path:
    shutil.copytree(REPO / "stages", tmp_path / "stages")
    if with_venv:
        (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def _run_without_site(project: Path) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages, so this interpreter cannot import photoprep (nor pandas).
    return subprocess.run(
        [sys.executable, "-S", "stages/validate.py"], cwd=project, capture_output=True, text=True, timeout=120
    )


def test_a_stage_started_by_another_python_reruns_with_the_project_venv(tmp_path):
    done = _run_without_site(_project(tmp_path, with_venv=True))
    # It got as far as photoprep's own check: params.yaml is missing in this bare folder.
    assert done.returncode == 1
    assert done.stderr.strip() == "photoprep: params.yaml: not found (run from the repository root)"


def test_without_a_project_venv_it_says_so_in_one_line(tmp_path):
    done = _run_without_site(_project(tmp_path, with_venv=False))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not have photoprep installed" in lines[0] and "make install" in lines[0]
