"""End to end: real `dvc repro` and `dvc exp run` on a temporary copy of this repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("PHOTOPREP_CACHE", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _decodes(repo: Path) -> list[dict]:
    log = repo / ".photoprep" / "cache" / "decodes.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC copy of the working tree, with the demo pipeline run once."""
    repo = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    for line in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        _run(line, repo)
    (repo / "dvc.lock").unlink(missing_ok=True)
    # One epoch keeps CI short; the default training is exercised by `make run` and its targets
    # by the train tests.
    params = (repo / "params.yaml").read_text().replace("  epochs: 20", "  epochs: 1", 1)
    (repo / "params.yaml").write_text(params)
    for line in (
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "one epoch"],
        ["dvc", "repro"],
    ):
        _run(line, repo)
    return repo


def test_repro_builds_the_demo_funnel(demo_repo: Path) -> None:
    funnel = json.loads((demo_repo / "reports" / "funnel.json").read_text())
    expected = json.loads((demo_repo / "pipeline" / "sources" / "demo" / "expected.json").read_text())
    assert funnel["malformed_lines"] == expected["malformed_lines"]
    assert funnel["unique_ids"] == expected["unique_ids"]
    assert funnel["fetch_failed_by_reason"] == {"not_found": expected["missing"]}
    assert funnel["exact_duplicates"] == expected["exact_duplicates"]
    assert funnel["near_duplicates"] == expected["near_duplicates"]
    assert funnel["broken_by_reason"] == expected["broken"]
    assert funnel["valid"] == expected["valid_unique_images"]
    assert sum(funnel["split"].values()) == funnel["kept"]


def test_second_repro_runs_nothing(demo_repo: Path) -> None:
    before = len(_decodes(demo_repo))
    out = _run(["dvc", "repro"], demo_repo)
    assert "Running stage" not in out
    assert len(_decodes(demo_repo)) == before


def test_near_threshold_experiment_decodes_nothing_again(demo_repo: Path) -> None:
    before = len(_decodes(demo_repo))
    out = _run(["dvc", "exp", "run", "-S", "dedup.near_threshold=6"], demo_repo)
    assert "Running stage 'dedup'" in out
    assert "download@demo" not in out.split("Running stage")[-1] or "Running stage 'download@demo'" not in out
    new = _decodes(demo_repo)[before:]
    assert new, "the dedup stage ran, so it logged its decodes"
    assert all(entry["decoded"] == 0 for entry in new), new


def test_bucket_size_experiment_reruns_bucket_and_after_only(demo_repo: Path) -> None:
    out = _run(["dvc", "exp", "run", "-S", "bucket.size=[32,32]"], demo_repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # split and funnel read only the table of kept images, which a new size leaves unchanged.
    assert {"bucket", "features"} <= ran
    assert not ran & {"download@demo", "dedup", "validate"}
    images = pd.read_parquet(demo_repo / "data" / "processed" / "images.parquet")
    import numpy as np

    assert np.load(demo_repo / "data" / "processed" / "images.npy", mmap_mode="r").shape == (len(images), 32, 32, 3)


def test_export_writes_a_split_for_tools_outside_the_pipeline(demo_repo: Path, tmp_path: Path) -> None:
    import numpy as np

    _run(["photoprep", "export", "--split", "test", "--format", "npz", str(tmp_path / "test.npz")], demo_repo)
    with np.load(tmp_path / "test.npz", allow_pickle=False) as saved:
        test = pd.read_parquet(demo_repo / "data" / "splits" / "test.parquet")
        assert saved["images"].shape[0] == len(test)
        assert set(saved["labels"]) <= set(range(10))
    _run(["photoprep", "export", "--split", "train", str(tmp_path / "train")], demo_repo)
    assert len(list((tmp_path / "train").glob("*/*.png"))) == len(
        pd.read_parquet(demo_repo / "data" / "splits" / "train.parquet")
    )


def test_train_experiment_reruns_train_and_evaluate_only(demo_repo: Path) -> None:
    out = _run(["dvc", "exp", "run", "-S", "train.epochs=2"], demo_repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate"}
    shown = _run(["dvc", "exp", "show", "--no-pager", "--md"], demo_repo)
    assert "accuracy" in shown and "train.epochs" in shown


def test_verify_passes_on_the_pipeline_state_and_fails_on_a_tampered_metric(demo_repo: Path) -> None:
    _run(["photoprep", "verify"], demo_repo)
    path = demo_repo / "metrics" / "eval.json"
    original = path.read_text()
    metrics = json.loads(original)
    metrics["accuracy"] = round(metrics["accuracy"] - 0.01, 6)
    path.write_text(json.dumps(metrics, indent=2))
    try:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        done = subprocess.run(["photoprep", "verify"], cwd=demo_repo, env=env, capture_output=True, text=True)
        assert done.returncode != 0
        assert "accuracy" in done.stdout + done.stderr
    finally:
        path.write_text(original)
