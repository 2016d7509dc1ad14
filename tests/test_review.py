"""Review: contact sheets and index of the clusters, and the export that comes back as a folder source."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from photoprep.core import chunked
from photoprep.core.errors import UserError
from photoprep.core.layout import Layout
from photoprep.ingest import manifest, sources
from photoprep.ingest.store import ShardWriter
from photoprep.learn import scores
from photoprep.review import clusters
from photoprep.review import export as review

REPO = Path(__file__).resolve().parents[1]
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A finished run in miniature: two sources (one local, one remote), the processed table, the
    split tables and a cluster table of 3 clusters over 9 images."""
    root = tmp_path / "project"
    src = root / "pipeline" / "sources"
    (src / "local" / "cdn").mkdir(parents=True)
    (src / "local" / "source.yaml").write_text("format: urls\nmanifest: list.txt\n")
    ids = {"local": [f"l{i}" for i in range(6)], "remote": ["r/0", "../r 1", "r2"]}
    rows = []
    for source, names in ids.items():
        with ShardWriter(root / "data" / "raw" / source, 1 << 20) as writer:
            blobs = {}
            for name in names:
                data = _png(len(rows))
                blobs[name] = (writer.add(data), data)
                if source == "local":
                    (src / "local" / "cdn" / name).write_bytes(data)
                rows.append({"source": source, "id": name, "data": data})
            refs = writer.flush()
        for row in rows:
            if row["source"] == source:
                sha = hashlib.sha256(row["data"]).hexdigest()
                ref = refs[sha]
                row.update(
                    sha256=sha,
                    shard=ref.shard,
                    offset=ref.offset,
                    size=ref.size,
                    format="PNG",
                    url=f"cdn/{row['id']}" if source == "local" else f"https://cdn.example/{row['id']}",
                )
    table = pd.DataFrame(rows).drop(columns="data")
    table["label"] = None
    table["row"] = range(len(table))
    (root / "data" / "processed").mkdir(parents=True)
    table.to_parquet(root / "data" / "processed" / "images.parquet")
    chunked.save(
        root / "data" / "processed" / "images",
        np.stack([np.asarray(Image.open(io.BytesIO(r["data"])).resize((16, 16))) for r in rows]),
    )
    labels = ["a", "a", "b", "b", None, "c", "a", None, "c"]
    split = pd.DataFrame(
        {
            "source": table["source"],
            "id": table["id"],
            "sha256": table["sha256"],
            "label": labels,
            "row": table["row"],
            "split": ["train" if lab else "unlabeled" for lab in labels],
        }
    )
    (root / "data" / "splits").mkdir()
    for name, part in split.groupby("split"):
        part.to_parquet(root / "data" / "splits" / f"{name}.parquet")
    clusters = pd.DataFrame(
        {
            "source": table["source"],
            "id": table["id"],
            "row": table["row"],
            "cluster": [0, 0, 1, 1, 2, 2, 0, 1, 2],
            "confidence": [0.9, 0.8, 0.7, 0.95, 0.5, 0.6, 0.99, 0.3, 0.85],
            "distance": [0.1, 0.2, 0.3, 0.05, 0.5, 0.4, 0.01, 0.9, 0.2],
        }
    )
    clusters.to_parquet(root / "data" / "clusters.parquet")
    return root


def _export(project: Path, out: Path, **kwargs) -> review.ReviewExport:
    return review.export_review(
        kwargs.pop("by", "cluster"),
        out,
        paths=Layout(project),
        **kwargs,
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- export layout


def test_export_by_cluster_is_a_folder_source_of_the_original_bytes(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "sources"
    result = _export(project, root / "reviewed")
    assert result.folders == {"cluster-00": 3, "cluster-01": 3, "cluster-02": 3}
    assert result.copied == 9 and result.linked == 0
    cfg = sources.load_source("reviewed", root=root)
    listed = manifest.read_manifest(cfg)
    assert listed.malformed.empty and len(listed.records) == 9
    assert set(listed.records["label"]) == {"cluster-00", "cluster-01", "cluster-02"}
    by_file = {
        r["file"]: r
        for r in csv.DictReader((root / "reviewed" / "review.csv").read_text(encoding="utf-8").splitlines())
    }
    images = pd.read_parquet(project / "data" / "processed" / "images.parquet").set_index(["source", "id"])
    for rel, row in by_file.items():
        data = (root / "reviewed" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == images.loc[(row["source"], row["id"]), "sha256"]
        assert row["cluster"] == str(int(rel.split("/")[1].removeprefix("cluster-")))


def test_file_names_are_safe_unique_and_the_same_in_every_export(project: Path, tmp_path: Path) -> None:
    _export(project, tmp_path / "one")
    _export(project, tmp_path / "two")
    first = _tree(tmp_path / "one")
    assert first == _tree(tmp_path / "two")
    images = [name for name in first if name.startswith("images/")]
    assert len(images) == 9
    for name in images:
        _, folder, file = name.split("/")
        assert SAFE_NAME.fullmatch(folder) and SAFE_NAME.fullmatch(file) and not file.startswith(".")
        assert file.endswith(".png")
    assert not any(".." in name for name in first)


def test_review_csv_lists_each_folder_nearest_first(project: Path, tmp_path: Path) -> None:
    _export(project, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "review.csv").read_text(encoding="utf-8").splitlines()))
    firsts = [r for r in rows if r["file"].startswith("images/cluster-00/")]
    assert [r["id"] for r in firsts] == ["r/0", "l0", "l1"]
    assert {r["label"] for r in firsts} == {"a"}


def test_symlink_mode_links_local_originals_and_copies_remote_images(project: Path, tmp_path: Path) -> None:
    result = _export(project, tmp_path / "out", mode="symlink")
    assert (result.linked, result.copied) == (6, 3)
    files = [p for p in (tmp_path / "out" / "images").rglob("*") if p.is_file() or p.is_symlink()]
    links = [p for p in files if p.is_symlink()]
    assert len(links) == 6
    for link in links:
        target = Path(os.readlink(link))
        assert target.is_absolute() and target.parent == project / "pipeline" / "sources" / "local" / "cdn"
        assert link.read_bytes() == target.read_bytes()
    copies = [p for p in files if not p.is_symlink()]
    assert all(p.name.startswith("remote__") for p in copies)


def test_a_local_original_that_changed_is_copied_from_the_store(project: Path, tmp_path: Path) -> None:
    (project / "pipeline" / "sources" / "local" / "cdn" / "l0").write_bytes(b"edited since the run")
    result = _export(project, tmp_path / "out", mode="symlink")
    assert (result.linked, result.copied) == (5, 4)


def test_min_confidence_and_splits_choose_what_is_exported(project: Path, tmp_path: Path) -> None:
    result = _export(project, tmp_path / "confident", min_confidence=0.8)
    assert result.files == 5 and result.skipped == {"below_confidence": 4}
    result = _export(project, tmp_path / "unlabeled", splits=["unlabeled"])
    assert result.files == 2 and result.skipped == {"not_in_splits": 7}


def test_export_by_prediction_makes_one_folder_per_predicted_class(project: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"predictions.parquet not found"):
        _export(project, tmp_path / "out", by="prediction")
    images = pd.read_parquet(project / "data" / "processed" / "images.parquet")
    pd.DataFrame(
        {
            "source": images["source"],
            "id": images["id"],
            "row": images["row"],
            "prediction": ["cat", "cat", "dog", "dog", "dog", "a/b", "cat", "dog", "cat"],
            "probability": np.linspace(0.5, 0.9, 9),
        }
    ).to_parquet(project / "data" / "predictions.parquet")
    result = _export(project, tmp_path / "out", by="prediction", min_confidence=0.6)
    assert set(result.folders) == {"cat", "dog", review.export.class_folders(["a/b"])["a/b"]}
    assert result.folders["cat"] == 2 and result.skipped == {"below_confidence": 2}


def test_a_non_empty_target_needs_overwrite(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        _export(project, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(UserError, match="not written by a photoprep review"):
        _export(project, out, overwrite=True)  # only a previous review export is ever replaced
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    _export(project, out)
    (out / "notes.txt").write_text("left by hand")
    _export(project, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "source.yaml").exists()


def test_review_export_under_a_file_is_a_user_error(project: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _export(project, tmp_path / "afile" / "out")


def test_a_cluster_table_from_another_run_is_a_user_error(project: Path, tmp_path: Path) -> None:
    clusters = pd.read_parquet(project / "data" / "clusters.parquet")
    clusters.loc[0, "id"] = "gone"
    clusters.to_parquet(project / "data" / "clusters.parquet")
    with pytest.raises(UserError, match="not in"):
        _export(project, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_bad_arguments_are_user_errors(project: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--by"):
        _export(project, tmp_path / "out", by="colour")
    with pytest.raises(UserError, match="mode"):
        _export(project, tmp_path / "out", mode="hardlink")
    with pytest.raises(UserError, match="min_confidence"):
        _export(project, tmp_path / "out", min_confidence=2.0)


# --------------------------------------------------------------------------- sheets and index


def test_cluster_sheets_and_index_link_relatively_and_load_nothing_else(
    project: Path, tmp_path: Path
) -> None:
    table = pd.read_parquet(project / "data" / "clusters.parquet")
    images = chunked.ChunkedArray(project / "data" / "processed" / "images")
    labels = ["a", "a", "b", "b", None, "c", "b", None, "c"]
    reports = tmp_path / "reports"
    (reports / "clusters").mkdir(parents=True)
    (reports / "clusters" / "cluster-07.png").write_bytes(b"a sheet of an earlier run")
    sheets = clusters.draw_cluster_sheets(
        table, images, labels, reports / "clusters", per_row=2, n_clusters=3
    )
    assert sorted(p.name for p in (reports / "clusters").iterdir()) == [
        "cluster-00.png",
        "cluster-01.png",
        "cluster-02.png",
    ]
    with Image.open(sheets[0]) as sheet:
        assert sheet.size[1] > 2 * 16  # two rows: nearest, farthest
    summary = scores.purity(labels, table["cluster"])
    page = reports / "clusters.html"
    clusters.write_cluster_index(
        summary, sheets, page, {"methods": {"dec": {"accuracy": 1, "nmi": 1, "ari": 1}}}
    )
    text = page.read_text(encoding="utf-8")
    sources_ = re.findall(r'(?:src|href)="([^"]+)"', text)
    images_ = [s for s in sources_ if s.endswith(".png")]
    assert images_ == ["clusters/cluster-00.png", "clusters/cluster-01.png", "clusters/cluster-02.png"]
    assert all((page.parent / s).exists() for s in images_)
    assert all(s.startswith("#") for s in sources_ if not s.endswith(".png"))
    assert "http" not in text and "<script" not in text
    assert "size 3 · labelled 3 · majority 'a' · purity 0.667" in text  # cluster-00 holds a, a, b


def test_the_cli_exports_and_says_what_it_skipped(project: Path, tmp_path: Path, capsys) -> None:
    from photoprep import cli

    out = tmp_path / "review"
    base = [
        "review",
        "export",
        "--root",
        str(project),
    ]
    cli.main([*base, "--by", "cluster", "--min-confidence", "0.8", str(out)])
    said = capsys.readouterr().out
    assert "wrote 5 images in 3 folders" in said and "skipped 4 below confidence" in said
    assert sorted(p.parent.name for p in (out / "images").glob("*/*")) == [
        "cluster-00",
        "cluster-00",
        "cluster-00",
        "cluster-01",
        "cluster-02",
    ]
    with pytest.raises(SystemExit) as exited:
        cli.main([*base, "--by", "cluster", str(out)])
    assert exited.value.code == 1
    assert "--overwrite" in capsys.readouterr().err
    cli.main([*base, "--by", "cluster", "--split", "unlabeled", "--overwrite", str(out)])
    assert len(list((out / "images").glob("*/*"))) == 2
