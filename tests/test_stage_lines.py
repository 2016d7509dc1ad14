"""Every stage says something a user can act on: one line on empty input, one summary line when done.

- each data stage, given no image, exits 1 with one line naming the cause upstream and the
  report to read, and no traceback;
- progress on a terminal is a tqdm bar, elsewhere a plain line at most every 10 s, nothing
  with PHOTOPREP_QUIET=1;
- a real `dvc repro` whose output is a file (as `make run > log 2>&1`) logs one summary line
  per stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from photoprep.core import chunked, console, errors

REPO = Path(__file__).resolve().parents[1]


def project(root: Path) -> Path:
    """A folder with params.yaml and a source `x` without labels."""
    source = root / "pipeline" / "sources" / "x"
    source.mkdir(parents=True)
    (source / "source.yaml").write_text('format: heobs\nmanifest: photos.txt\nurl: "http://h/{id}"\n')
    (source / "photos.txt").write_text("a | t | eng\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"sources": ["x"]}))
    return root


def put(root: Path, rel: str, table: pd.DataFrame) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)


def stage(root: Path, name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PHOTOPREP_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stops_with(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


FAILED_ROWS = pd.DataFrame(
    {
        "source": ["x"] * 3,
        "id": ["a", "b", "c"],
        "url": ["http://h/a", "http://h/b", "http://h/c"],
        "status": ["failed"] * 3,
        "reason": ["connect_error"] * 2 + ["http_404"],
        "http_status": [0, 0, 404],
        "attempts": [5, 5, 1],
        "sha256": [""] * 3,
        "size": [0] * 3,
        "mime": [""] * 3,
        "shard": [""] * 3,
        "offset": [0] * 3,
    }
)


def test_dedup_with_nothing_downloaded_names_the_download_and_its_failed_csv(tmp_path):
    root = project(tmp_path)
    put(root, "data/raw/x.parquet", FAILED_ROWS)
    line = stops_with(stage(root, "dedup"))
    assert line == (
        "photoprep: dedup: no image to work on: download@x fetched 0 of 3 (connect_error 2, http_404 1); "
        "see reports/download/<source>/failed.csv"
    )


def test_validate_with_no_image_left_after_dedup_stops(tmp_path):
    root = project(tmp_path)
    put(
        root,
        "data/interim/dedup.parquet",
        FAILED_ROWS.rename(columns={"reason": "fetch_reason"}).assign(
            dup_of="", decode_reason="", width=0, height=0
        ),
    )
    line = stops_with(stage(root, "validate"))
    assert line.startswith("photoprep: validate: no image to work on: dedup left no fetched image; see ")
    assert line.endswith("reports/counts/dedup.json")


def test_bucket_with_every_image_broken_names_the_reasons_and_broken_csv(tmp_path):
    root = project(tmp_path)
    valid = pd.DataFrame(
        {"source": ["x", "x"], "id": ["a", "b"], "valid": [False, False], "reason": ["too_small", "corrupt"]}
    ).assign(width=10, height=10)
    put(root, "data/interim/valid.parquet", valid)
    line = stops_with(stage(root, "bucket"))
    assert line == (
        "photoprep: bucket: no image to work on: validate passed 0 of 2 images (corrupt 1, too_small 1); "
        "see reports/broken.csv"
    )


def test_bucket_that_drops_every_bucket_says_so(tmp_path):
    root = project(tmp_path)
    (root / "params.yaml").write_text(yaml.safe_dump({"sources": ["x"], "bucket": {"min_count": 5}}))
    valid = pd.DataFrame({"source": ["x", "x"], "id": ["a", "b"], "valid": [True, True], "reason": ["", ""]})
    put(root, "data/interim/valid.parquet", valid.assign(width=100, height=80))
    line = stops_with(stage(root, "bucket"))
    assert "bucket.keep and bucket.min_count dropped every bucket (2 images)" in line
    assert line.endswith("see plots/resolutions.csv")


def test_features_with_no_image_stops(tmp_path):
    root = project(tmp_path)
    (root / "data" / "processed").mkdir(parents=True)
    chunked.save(root / "data" / "processed" / "images", np.zeros((0, 64, 64, 3), np.uint8))
    put(root, "data/processed/images.parquet", pd.DataFrame({"source": [], "id": [], "row": []}))
    line = stops_with(stage(root, "features"))
    assert (
        line
        == "photoprep: features: no image to work on: bucket kept no image; see reports/counts/bucket.json"
    )


def test_split_with_no_image_stops(tmp_path):
    root = project(tmp_path)
    put(root, "data/processed/images.parquet", pd.DataFrame({"source": [], "id": [], "row": []}))
    line = stops_with(stage(root, "split"))
    assert (
        line == "photoprep: split: no image to work on: bucket kept no image; see reports/counts/bucket.json"
    )


def test_split_with_no_labelled_image_stops(tmp_path):
    root = project(tmp_path)
    images = pd.DataFrame({"source": ["x"], "id": ["a"], "sha256": ["0" * 64], "label": [None], "row": [0]})
    put(root, "data/processed/images.parquet", images)
    members = pd.DataFrame({"source": ["x"], "id": ["a"], "label": [None], "group": [-1], "dup_of": [""]})
    put(root, "data/interim/dedup.parquet", members)
    line = stops_with(stage(root, "split"))
    assert "split: no image to work on: none of the 1 images has a label" in line
    assert line.endswith("labels_unmatched.csv")


# -- progress and summaries ----------------------------------------------------------------


def test_progress_off_a_terminal_is_a_plain_line_at_most_every_10_s(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    monkeypatch.delenv(console.QUIET_ENV, raising=False)
    with console.Progress(1000, "fetch demo") as bar:
        assert bar.bar is None  # pytest's stderr is not a terminal
        for _ in range(100):
            clock[0] += 0.5  # 50 s in all
            bar.update(10)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5
    assert lines[0] == "fetch demo: 200 of 1,000 img (20%), 10 s"
    assert "\r" not in "".join(lines)


def test_quiet_silences_progress_but_not_the_summary(monkeypatch, capsys):
    monkeypatch.setenv(console.QUIET_ENV, "1")
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 0.0)
    with console.Progress(10, "fetch") as bar:
        bar.update(10)
    errors.run_stage(lambda: "10 images", name="dedup")
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.startswith("dedup: 10 images in ") and out.out.endswith(" s\n")


def test_keyboard_interrupt_is_one_line_and_exit_130(capsys):
    def main() -> str:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        errors.run_stage(main, name="bucket")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "photoprep: bucket: interrupted; nothing written, run it again\n"


@pytest.mark.slow
def test_dvc_repro_into_a_log_file_has_one_summary_line_per_stage(tmp_path):
    repo = tmp_path / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    env.pop("PHOTOPREP_CACHE", None)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    log = repo / "log"
    with open(log, "w") as out:  # a file, as `make run > log 2>&1`: nothing is a terminal
        done = subprocess.run(
            ["dvc", "repro", "funnel", "features"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    for name in ("download@demo", "dedup", "validate", "bucket", "features", "split", "funnel"):
        lines = [line for line in text.splitlines() if line.startswith(f"{name}: ")]
        assert len(lines) == 1, (name, text[-3000:])
        assert lines[0].endswith(" s"), lines[0]
