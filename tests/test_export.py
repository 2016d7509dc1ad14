"""Specification of split exports: safe image folders and pickle-free .npz files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from photoprep.core.errors import UserError
from photoprep.dataset.export import class_folders, export_split, file_name, safe_component

H, W = 12, 10
HOSTILE_IDS = [
    "../../etc/passwd",
    "/abs/path",
    "a/b\\c",
    "..",
    ".",
    "",
    "CON",
    "x" * 300,
    "ünï cødé ☃",
    "dup",
    "DUP",
    "a:b*c?d",
    "nul\0byte",
]


@pytest.fixture
def arrays() -> np.ndarray:
    """20 distinct images: image k is filled with k in red, its row number in green."""
    imgs = np.zeros((20, H, W, 3), dtype=np.uint8)
    for k in range(20):
        imgs[k, ..., 0] = k
        imgs[k, ..., 1] = np.arange(W, dtype=np.uint8)[None, :] * 3
        imgs[k, ..., 2] = 255 - k
    return imgs


def split_table(
    ids: list[str], labels: list[str | None], rows: list[int], source: str = "src"
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source": source,
            "id": ids,
            "sha256": [f"{r:064x}" for r in rows],
            "label": labels,
            "row": rows,
            "split": "train",
        }
    )


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_writes_readable_pngs_in_class_folders(tmp_path, arrays):
    t = split_table(["a1", "a2", "b1", "u1"], ["cat", "cat", "dog", None], [3, 5, 7, 11])
    out = export_split(t, arrays, tmp_path / "train", "imagefolder", ["cat", "dog"])

    assert out == tmp_path / "train"
    pngs = [p for p in all_files(out) if p.suffix == ".png"]
    assert sorted(p.parent.name for p in pngs) == ["_unlabeled", "cat", "cat", "dog"]
    manifest = list(csv.DictReader((out / "manifest.csv").read_text(encoding="utf-8").splitlines()))
    assert len(manifest) == 4
    for rec in manifest:
        path = out / rec["file"]
        pixels = np.asarray(Image.open(path))
        assert pixels.dtype == np.uint8 and pixels.shape == (H, W, 3)
        np.testing.assert_array_equal(pixels, arrays[int(rec["row"])])
        assert path.parent.name == (rec["label"] or "_unlabeled")
        assert path.name.startswith("src__" + rec["id"])
    info = json.loads((out / "classes.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["folders"] == ["cat", "dog"]


def test_hostile_ids_stay_inside_the_folder_and_never_collide(tmp_path, arrays):
    n = len(HOSTILE_IDS)
    t = split_table(HOSTILE_IDS, ["x"] * n, list(range(n)), source="../evil/src")
    out = export_split(t, arrays, tmp_path / "out", "imagefolder", ["x"])

    pngs = [p for p in all_files(tmp_path) if p.suffix == ".png"]
    assert len(pngs) == n  # one file each, 'dup' and 'DUP' too (case-insensitive file systems)
    assert len({p.name.casefold() for p in pngs}) == n
    for p in pngs:
        assert p.parent == out / "x"
        assert ".." not in p.name and "/" not in p.name and "\\" not in p.name and "\0" not in p.name
        assert not p.name.startswith(".")
        assert len(p.name) < 140
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary leftovers


def test_file_names_are_deterministic_and_keyed_on_the_exact_key():
    assert file_name("s", "a/b") == file_name("s", "a/b")
    assert file_name("s", "a/b") != file_name("s", "a_b")  # same cleaned text, different hash
    assert file_name("s", "a") != file_name("t", "a")
    assert safe_component("../../x") == "x"
    assert safe_component("..") == "x"


def test_hostile_class_names_get_safe_distinct_folders(tmp_path, arrays):
    classes = ["../up", "a/b", "Cat", "cat", "_unlabeled", "ok"]
    folders = class_folders(classes)
    assert folders["ok"] == "ok"
    assert len({f.casefold() for f in folders.values()} | {"_unlabeled"}) == len(classes) + 1
    for f in folders.values():
        assert "/" not in f and ".." not in f and not f.startswith(".")
    t = split_table(
        [f"i{k}" for k in range(len(classes))] + ["u"], [*classes, None], list(range(len(classes) + 1))
    )
    out = export_split(t, arrays, tmp_path / "out", "imagefolder", classes)
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(dirs) == len(classes) + 1 and "_unlabeled" in dirs
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_imagefolder_refuses_a_non_empty_folder_unless_overwrite(tmp_path, arrays):
    out = tmp_path / "train"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    t = split_table(["a"], ["cat"], [0])
    with pytest.raises(UserError, match="not empty"):
        export_split(t, arrays, out, "imagefolder", ["cat"])
    assert (out / "keep.txt").read_text() == "mine"

    # --overwrite replaces only a folder that an export wrote: this one was not.
    with pytest.raises(UserError, match="not written by a photoprep export"):
        export_split(t, arrays, out, "imagefolder", ["cat"], overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"

    (out / "keep.txt").unlink()
    export_split(t, arrays, out, "imagefolder", ["cat"])
    (out / "stale.txt").write_text("left by hand in an export")
    export_split(t, arrays, out, "imagefolder", ["cat"], overwrite=True)
    assert not (out / "stale.txt").exists()
    assert len([p for p in all_files(out) if p.suffix == ".png"]) == 1


def _project(tmp_path):
    """A folder that looks like a photoprep checkout: dvc.yaml, .git, data/raw with a shard."""
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "shard-0.tar").write_bytes(b"shard")
    (root / "models").mkdir()
    return root


@pytest.mark.parametrize(
    "where",
    ["the current directory", "the project", "data/raw", "models", "a folder holding a .git", "under a file"],
)
def test_overwrite_never_replaces_a_project_its_data_or_the_current_directory(
    tmp_path, arrays, monkeypatch, where
):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "manifest.csv").write_text("a previous export, it seems\n")
    (tmp_path / "afile").write_text("x")
    out = {
        "the current directory": Path("."),
        "the project": root,
        "data/raw": Path("data/raw"),
        "models": Path("models"),
        "a folder holding a .git": tmp_path / "repo",
        "under a file": tmp_path / "afile" / "out",
    }[where]
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    t = split_table(["a"], ["cat"], [0])
    with pytest.raises(UserError, match="export: "):
        export_split(t, arrays, out, "imagefolder", ["cat"], overwrite=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_imagefolder_into_an_empty_existing_folder_is_fine(tmp_path, arrays):
    (tmp_path / "train").mkdir()
    export_split(split_table(["a"], ["cat"], [0]), arrays, tmp_path / "train", "imagefolder", ["cat"])
    assert (tmp_path / "train" / "cat").is_dir()


def test_imagefolder_is_byte_identical_across_runs(tmp_path, arrays):
    t = split_table(["b", "a", "c"], ["cat", None, "dog"], [1, 2, 3])
    a = export_split(t, arrays, tmp_path / "a", "imagefolder", ["cat", "dog"])
    b = export_split(t.iloc[::-1], arrays, tmp_path / "b", "imagefolder", ["cat", "dog"])
    fa, fb = all_files(a), all_files(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    assert [p.read_bytes() for p in fa] == [p.read_bytes() for p in fb]


# --------------------------------------------------------------------------- npz


def test_npz_loads_without_pickle_with_shapes_and_labels(tmp_path, arrays):
    t = split_table(["a", "b", "c", "d"], ["dog", None, "cat", "dog"], [4, 0, 19, 2])
    path = export_split(t, arrays, tmp_path / "train.npz", "npz", ["cat", "dog"])
    assert path == tmp_path / "train.npz"

    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"images", "labels", "classes", "ids", "sources", "rows"}
        assert z["images"].dtype == np.uint8 and z["images"].shape == (4, H, W, 3)
        np.testing.assert_array_equal(z["images"], arrays[[4, 0, 19, 2]])
        assert z["labels"].dtype == np.int64
        assert z["labels"].tolist() == [1, -1, 0, 1]
        assert z["classes"].dtype.kind == "U" and z["classes"].tolist() == ["cat", "dog"]
        assert z["ids"].dtype.kind == "U" and z["ids"].tolist() == ["a", "b", "c", "d"]
        assert z["sources"].tolist() == ["src"] * 4
        assert z["rows"].tolist() == [4, 0, 19, 2]


def test_npz_from_a_memory_map_and_into_a_folder_named_by_split(tmp_path, arrays):
    np.save(tmp_path / "images.npy", arrays)
    mm = np.load(tmp_path / "images.npy", mmap_mode="r")
    t = split_table(["a", "b"], ["x", "x"], [1, 2]).assign(split="val")
    path = export_split(t, mm, tmp_path / "splits", "npz", ["x"])
    assert path == tmp_path / "splits" / "val.npz"
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["images"], arrays[[1, 2]])


def test_npz_is_byte_identical_across_runs(tmp_path, arrays):
    t = split_table(["a", "b"], ["x", None], [1, 2])
    a = export_split(t, arrays, tmp_path / "a.npz", "npz", ["x"])
    b = export_split(t, arrays, tmp_path / "b.npz", "npz", ["x"])
    assert a.read_bytes() == b.read_bytes()


def test_npz_of_an_empty_split_still_has_typed_arrays(tmp_path, arrays):
    t = split_table([], [], [])
    path = export_split(t, arrays, tmp_path / "e.npz", "npz", ["x"])
    with np.load(path, allow_pickle=False) as z:
        assert z["images"].shape == (0, H, W, 3) and z["images"].dtype == np.uint8
        assert z["labels"].shape == (0,) and z["ids"].dtype.kind == "U"


def test_npz_refuses_to_overwrite_unless_asked(tmp_path, arrays):
    t = split_table(["a"], ["x"], [1])
    path = export_split(t, arrays, tmp_path / "t.npz", "npz", ["x"])
    with pytest.raises(UserError, match="already exists"):
        export_split(t, arrays, path, "npz", ["x"])
    t2 = split_table(["a", "b"], ["x", "x"], [1, 2])
    export_split(t2, arrays, path, "npz", ["x"], overwrite=True)
    with np.load(path, allow_pickle=False) as z:
        assert len(z["ids"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_user_errors(tmp_path, arrays):
    t = split_table(["a"], ["x"], [1])
    with pytest.raises(UserError, match="format"):
        export_split(t, arrays, tmp_path / "o", "pickle", ["x"])
    with pytest.raises(UserError, match="not one of the classes"):
        export_split(t, arrays, tmp_path / "o.npz", "npz", ["y"])
    with pytest.raises(UserError, match="row indices"):
        export_split(split_table(["a"], ["x"], [20]), arrays, tmp_path / "o.npz", "npz", ["x"])
    with pytest.raises(UserError, match="uint8"):
        export_split(t, arrays.astype(np.float32), tmp_path / "o.npz", "npz", ["x"])
    assert os.listdir(tmp_path) == []
