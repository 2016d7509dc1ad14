"""params.yaml is validated once, and bad values read as one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from photoprep.core import params
from photoprep.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_load_with_the_demo_enabled():
    loaded = params.load(REPO / "params.yaml")
    assert loaded.sources == ["demo"]
    assert loaded.bucket.size == (64, 64)
    assert loaded.validate.min_side == 32


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dedup": {"hash_size": 2}}, "params.yaml: dedup.hash_size: must be >= 4 (got 2)"),
        (
            {"dedup": {"hash": "md5"}},
            "params.yaml: dedup.hash: must be one of 'phash', 'dhash', 'whash' or 'ahash' (got 'md5')",
        ),
        ({"dedup": {"colour": 1}}, "params.yaml: dedup.colour: unknown key"),
        ({"validate": {"min_side": 0}}, "params.yaml: validate.min_side: must be >= 1 (got 0)"),
        (
            {"split": {"ratios": {"train": 0.5, "test": 0.2}}},
            "params.yaml: split.ratios: must be >= 0 and sum to 1",
        ),
        ({"compute": {"n_jobs": 0}}, "params.yaml: compute.n_jobs: must be a positive number"),
        ({"sources": []}, "sources: list at least one source"),
        # Values that used to pass validation and then crashed a stage or changed its results:
        ({"dedup": {"near_threshold": 100}}, "params.yaml: dedup.near_threshold: must be <= 32"),
        (
            {"dedup": {"hash": "whash", "hash_size": 7}},
            "params.yaml: dedup.hash_size: whash needs a power of 2",
        ),
        (
            {"features": {"hog": {"pixels_per_cell": [0, 0]}}},
            "params.yaml: features.hog.pixels_per_cell: both values must be >= 1",
        ),
        (
            {"features": {"hog": {"cells_per_block": [0, 0]}}},
            "params.yaml: features.hog.cells_per_block: both values must be >= 1",
        ),
        ({"features": {"color_size": [0, 0]}}, "params.yaml: features.color_size: both values must be >= 1"),
        (
            {"split": {"ratios": {"train": float("nan"), "val": 0.5, "test": 0.5}}},
            "params.yaml: split.ratios: must be >= 0 and sum to 1",
        ),
        (
            {"download": {"concurrency": True}},
            "params.yaml: download.concurrency: must be a number, not true",
        ),
        ({"split": {"classes": True}}, "params.yaml: split.classes"),
        (
            {"dedup": {"keep": "newest"}},
            "params.yaml: dedup.keep: must be one of 'best', 'largest' or 'first'",
        ),
        ({"dedup": {"transforms": ["hflip", "hflip"]}}, "params.yaml: dedup.transforms: each transform once"),
        ({"dedup": {"transforms": ["shear"]}}, "params.yaml: dedup.transforms.0: must be one of 'hflip'"),
        (
            {"dedup": {"verify_threshold": 300}},
            "params.yaml: dedup.verify_threshold: must be <= 256 (got 300)",
        ),
        ({"dedup": {"margin": 0.3}}, "params.yaml: dedup.margin: must be <= 0.2 (got 0.3)"),
        (
            {"dedup": {"crops": [0.06, 0.03]}},
            "params.yaml: dedup.crops: shares of each side in (0, 0.2], ascending",
        ),
        ({"dedup": {"crops": [0.5]}}, "params.yaml: dedup.crops: shares of each side in (0, 0.2], ascending"),
        ({"decode": {"max_decode_mb": 0}}, "params.yaml: decode.max_decode_mb: must be >= 1 (got 0)"),
    ],
)
def test_bad_value_names_the_key_path(raw, message):
    with pytest.raises(UserError) as caught:
        params.parse(raw)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        params.load(tmp_path / "params.yaml")


def test_stage_with_bad_params_exits_1_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("dedup:\n  hash_size: 2\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "validate.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "photoprep: params.yaml: dedup.hash_size: must be >= 4 (got 2)"


def test_params_command_checks_that_every_enabled_source_exists(tmp_path):
    (tmp_path / "params.yaml").write_text("sources: [nonexistent]\n")
    done = subprocess.run(
        [sys.executable, "-m", "photoprep.cli", "params"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "source 'nonexistent'" in done.stderr and "not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_params_command_accepts_the_repository_params():
    done = subprocess.run(
        [sys.executable, "-m", "photoprep.cli", "params"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "ok (demo enabled" in done.stdout
