"""The README's commands run as written, on a fresh copy of the repository.

`make run` (the Quick start) runs in full, so this module is also the test of the README's
reproducibility promise: the outputs it produces are the ones the committed dvc.lock records,
byte for byte, wall-clock files aside. Every other fenced `bash` block that the README marks
with ``<!-- tested: tests/test_readme.py -->`` runs after it, as one bash script per block.
`make test` is what runs this test, so here it is only dry-run (`make -n test`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- tested: tests/test_readme.py -->"
# Wall-clock figures: DVC outputs whose bytes differ on every run, by design (never metrics).
WALL_CLOCK = {"metrics/perf.json", "reports/train_perf.json", "reports/cluster_perf.json"}
pytestmark = pytest.mark.slow


def readme_blocks() -> list[str]:
    """The bash blocks the README marks as tested, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, flags=re.S)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PHOTOPREP_CACHE", "VIRTUAL_ENV")}
    env["DVC_NO_ANALYTICS"] = "1"
    # The README's own view: a shell whose `python` is not the project's (the stages find it).
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    return env


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = re.sub(r"^make test\b", "make -n test", script, flags=re.M)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh copy of the committed tree (git's files only) where `make run` has run as written.

    It shares this test's venv, so a README block's `pip install -e .` points the venv's photoprep
    at the copy: the teardown points it back here."""
    repo = tmp_path_factory.mktemp("fresh")
    listed = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    # The venv is this test's own (installing another would take minutes): `make run` finds it ready.
    (repo / ".venv").symlink_to(Path(sys.prefix))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "fresh clone"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    quick_start = readme_blocks()[0]
    assert "make run" in quick_start
    done = _bash(quick_start, repo)
    assert done.returncode == 0, f"Quick start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    yield repo
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(REPO)],
        capture_output=True,
        check=False,
    )


def _outs(lock: dict) -> dict[str, str]:
    outs = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out["md5"]
    return outs


def test_make_run_reproduces_the_committed_results_byte_for_byte(fresh: Path) -> None:
    committed = _outs(yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8")))
    produced = _outs(yaml.safe_load((fresh / "dvc.lock").read_text(encoding="utf-8")))
    assert set(committed) == set(produced)
    differ = sorted(p for p in committed if committed[p] != produced[p] and p not in WALL_CLOCK)
    assert differ == [], f"outputs that differ from the committed dvc.lock: {differ}"
    for path in ("metrics/eval.json", "metrics/cluster.json", "metrics/predict.json", "reports/funnel.json"):
        assert (fresh / path).read_bytes() == (REPO / path).read_bytes(), path


@pytest.mark.parametrize("index", range(1, len(readme_blocks())), ids=lambda i: f"block{i}")
def test_every_tested_readme_block_runs_as_written(fresh: Path, index: int) -> None:
    block = readme_blocks()[index]
    done = _bash(block, fresh)
    assert done.returncode == 0, (
        f"README block failed:\n{block}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


def test_the_readme_marks_blocks_to_test() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 3 and "make run" in blocks[0]


def test_make_run_writes_a_report_page_that_opens_cleanly_in_a_browser(fresh: Path) -> None:
    from browser import chromium, open_page

    if chromium() is None:
        pytest.skip("needs Chromium (.ci/run installs it)")
    check = open_page(fresh / "reports" / "index.html")
    assert check.clean, check
    assert check.images >= 9
