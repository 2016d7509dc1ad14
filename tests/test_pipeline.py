"""End to end: real `dvc repro` and `dvc exp run` on a temporary copy of this repository."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from photoprep.core.chunked import ChunkedArray

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    """The environment of the commands: this interpreter's bin first (dvc, photoprep, python)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("PHOTOPREP_CACHE", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
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
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
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
    # One epoch and a short DEC keep CI short; the defaults are exercised by `make run` and their
    # targets by the train and cluster tests.
    params = (repo / "params.yaml").read_text()
    for default, short in (
        ("  epochs: 20", "  epochs: 1"),
        ("  pretrain_epochs: 100", "  pretrain_epochs: 2"),
        ("  max_iter: 2000", "  max_iter: 60"),
    ):
        assert params.count(default) == 1, default
        params = params.replace(default, short)
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


def test_repro_looks_inside_the_model_and_the_page_links_it(demo_repo: Path) -> None:
    tsne = pd.read_csv(demo_repo / "plots" / "tsne.csv", dtype=str)
    test = pd.read_parquet(demo_repo / "data" / "splits" / "test.parquet")
    assert len(tsne) == len(test) and list(tsne["id"]) == list(test["id"])
    for name in ("tsne.png", "filters.png", "top5.png", "top5.csv"):
        assert (demo_repo / "reports" / name).stat().st_size > 0, name
    page = (demo_repo / "reports" / "index.html").read_text(encoding="utf-8")
    assert '<img src="tsne.png"' in page and 'href="../plots/tsne.csv"' in page
    shown = json.loads(_run(["dvc", "plots", "show", "--json", "plots/tsne.csv"], demo_repo))
    spec = shown["data"]["dvc.yaml::plots/tsne.csv"][0]["content"]  # dvc.yaml's definition
    assert spec["mark"]["type"] == "point" and spec["encoding"]["x"]["field"] == "x"
    assert len(spec["data"]["values"]) == len(test)


def test_repro_clusters_every_kept_image_beside_both_baselines(demo_repo: Path) -> None:
    metrics = json.loads((demo_repo / "metrics" / "cluster.json").read_text())
    funnel = json.loads((demo_repo / "reports" / "funnel.json").read_text())
    assert metrics["n_images"] == funnel["kept"] == metrics["n_labeled"]
    assert set(metrics["methods"]) == {"kmeans_features", "kmeans_embedding", "dec"}
    for scores in metrics["methods"].values():
        assert set(scores) == {"accuracy", "nmi", "ari"}
        assert scores["accuracy"] > 0.2, "ten balanced digits: chance is 0.1"
    assert metrics["kmeans"]["n_init"] >= 10
    table = pd.read_parquet(demo_repo / "data" / "clusters.parquet")
    assert len(table) == funnel["kept"] and set(table["cluster"]) == set(range(metrics["n_clusters"]))
    page = (demo_repo / "reports" / "clusters.html").read_text()
    sheets = sorted(p.name for p in (demo_repo / "reports" / "clusters").glob("cluster-*.png"))
    assert len(sheets) == metrics["n_clusters"]
    assert all(f'src="clusters/{name}"' in page for name in sheets)


def test_repro_predicts_with_top3_and_review_exports_only_the_confident(
    demo_repo: Path, tmp_path: Path
) -> None:
    table = pd.read_parquet(demo_repo / "data" / "predictions.parquet")
    test = pd.read_parquet(demo_repo / "data" / "splits" / "test.parquet")
    assert len(table) == len(test), "the demo has no unlabeled image: predict labels test to calibrate"
    probs = table[["probability_1", "probability_2", "probability_3"]].to_numpy()
    assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    assert (table["prediction"] == table["class_1"]).all()
    threshold = float(table["probability"].median())
    out = tmp_path / "confident"
    _run(
        ["photoprep", "review", "export", "--by", "prediction", "--min-confidence", str(threshold), str(out)],
        demo_repo,
    )
    exported = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").glob("*/*"))
    sure = table[table["probability"] >= threshold]
    assert len(exported) == len(sure) < len(table)
    assert sorted(p.split("/")[0] for p in exported) == sorted(sure["prediction"])


def test_second_repro_runs_nothing(demo_repo: Path) -> None:
    before = len(_decodes(demo_repo))
    out = _run(["dvc", "repro"], demo_repo)
    assert "Running stage" not in out
    assert len(_decodes(demo_repo)) == before


def test_each_chunk_is_a_memo_part_and_an_object_of_dvcs_cache(demo_repo: Path) -> None:
    for folder, namespace in (("data/processed/images", "pixels"), ("data/features/features", "features")):
        chunks = sorted((demo_repo / folder).glob("part-*.npy"))
        assert len(chunks) > 1, folder
        for chunk in chunks:
            data = chunk.read_bytes()
            md5 = hashlib.md5(data).hexdigest()
            cached = demo_repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
            assert cached.read_bytes() == data, chunk  # DVC caches the folder file by file
            parts = list((demo_repo / ".photoprep" / "cache" / namespace).glob(f"*/{chunk.name}"))
            assert any(part.read_bytes() == data for part in parts), chunk


def test_near_threshold_experiment_decodes_nothing_again(demo_repo: Path) -> None:
    before = len(_decodes(demo_repo))
    # 5: the demo's distinct digits are 6 bits apart at the default margin, so the groups stay.
    out = _run(["dvc", "exp", "run", "-S", "dedup.near_threshold=5"], demo_repo)
    assert "Running stage 'dedup'" in out
    assert "download@demo" not in out.split("Running stage")[-1] or "Running stage 'download@demo'" not in out
    new = _decodes(demo_repo)[before:]
    assert new, "the dedup stage ran, so it logged its decodes"
    assert all(entry["decoded"] == 0 for entry in new), new
    assert "Running stage 'validate'" not in out  # same groups, same table: nothing after dedup runs


def test_bucket_size_experiment_reruns_bucket_and_after_only(demo_repo: Path) -> None:
    out = _run(["dvc", "exp", "run", "-S", "bucket.size=[32,32]"], demo_repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # split and funnel read only the table of kept images, which a new size leaves unchanged.
    assert {"bucket", "features"} <= ran
    assert not ran & {"download@demo", "dedup", "validate"}
    images = pd.read_parquet(demo_repo / "data" / "processed" / "images.parquet")

    assert ChunkedArray(demo_repo / "data" / "processed" / "images").shape == (
        len(images),
        32,
        32,
        3,
    )


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


def test_train_experiment_reruns_train_evaluate_and_predict_only(demo_repo: Path) -> None:
    out = _run(["dvc", "exp", "run", "-S", "train.epochs=2"], demo_repo)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # embed reads the model but, clustering features, writes the same note: cluster does not re-run.
    assert ran == {"train", "evaluate", "introspect", "predict", "embed", "report"}
    shown = _run(["dvc", "exp", "show", "--no-pager", "--md"], demo_repo)
    assert "accuracy" in shown and "train.epochs" in shown


def test_a_queued_grid_runs_on_one_worker_and_exp_show_ranks_it(demo_repo: Path) -> None:
    """The README's sweep recipe on a small grid: two models, one epoch each (the fixture's), up
    to evaluate (the metric ranked) to keep the test short; upstream stages come from the cache."""
    out = _run(["dvc", "exp", "run", "--queue", "-S", "train.model=smallcnn,mlp", "evaluate"], demo_repo)
    assert out.count("Queued experiment") == 2, out
    try:
        _run(["dvc", "queue", "start", "-j", "1"], demo_repo)
        deadline = time.monotonic() + 600
        while True:
            status = _run(["dvc", "queue", "status"], demo_repo)
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:  # no worker outlives the test, whatever happened
        subprocess.run(
            ["dvc", "queue", "stop", "--kill"], cwd=demo_repo, env=_env(), capture_output=True, timeout=120
        )
    assert status.count("Success") == 2 and "Failed" not in status, status
    table = _run(["dvc", "exp", "show", "--csv", "--sort-by", "metrics/eval.json:accuracy"], demo_repo)
    rows = [r for r in csv.DictReader(table.splitlines()) if r.get("State") == "Success"]
    column = next(c for c in ("metrics/eval.json:accuracy", "accuracy") if rows and c in rows[0])
    grid = {r["train.model"]: float(r[column]) for r in rows}
    assert set(grid) == {"smallcnn", "mlp"}, table
    assert all(0.0 <= a <= 1.0 for a in grid.values())
    accuracies = [float(r[column]) for r in rows]
    assert accuracies == sorted(accuracies), "--sort-by ranks the experiments"


def _commit(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", message, "--allow-empty"], repo)


def test_verify_passes_on_the_pipeline_state_and_fails_on_a_tampered_metric(demo_repo: Path) -> None:
    _commit(demo_repo, "results")  # verify compares with the committed figures (HEAD)
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


def test_a_grader_pulls_the_artifacts_from_a_real_remote_and_verifies_them(
    demo_repo: Path, tmp_path: Path, webdav
) -> None:
    """The grading round trip: commit, `dvc push` to a WebDAV server on 127.0.0.1, a fresh
    `git clone`, `dvc pull`, `photoprep verify`; a tampered metric or model fails it."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run(["dvc", "remote", "add", "-d", "-f", "storage", webdav.url], demo_repo)
    _run([*git, "add", "-A"], demo_repo)
    _run([*git, "commit", "-qm", "results", "--allow-empty"], demo_repo)
    _run(["dvc", "push"], demo_repo)
    assert any(webdav.root.rglob("*")), "the remote holds the pushed cache"

    grader = tmp_path / "grader"
    _run(["git", "clone", "-q", str(demo_repo), str(grader)], tmp_path)
    assert not (grader / "models" / "model.pt").exists()
    _run(["dvc", "pull"], grader)
    assert (grader / "models" / "model.pt").read_bytes() == (demo_repo / "models" / "model.pt").read_bytes()
    out = _run(["photoprep", "verify"], grader)
    assert "ok" in out

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    metrics_path = grader / "metrics" / "eval.json"
    original = metrics_path.read_text()
    metrics = json.loads(original)
    metrics["accuracy"] = round(metrics["accuracy"] - 0.01, 6)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    done = subprocess.run(["photoprep", "verify"], cwd=grader, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "accuracy" in done.stdout + done.stderr
    metrics_path.write_text(original)

    import torch

    model_path = grader / "models" / "model.pt"
    saved = torch.load(model_path, weights_only=True)
    first = next(k for k, v in saved["state_dict"].items() if v.is_floating_point() and v.dim() > 1)
    saved["state_dict"][first] = -saved["state_dict"][first]
    model_path.unlink()  # pulled from the cache as a link or a copy: replace it, never write through it
    torch.save(saved, model_path)
    done = subprocess.run(["photoprep", "verify"], cwd=grader, env=env, capture_output=True, text=True)
    assert done.returncode != 0, done.stdout


def test_reviewed_cluster_folders_come_back_as_labels_in_the_splits(demo_repo: Path, tmp_path: Path) -> None:
    """The review loop: export the clusters, rename, move and delete files, add the folder as a source."""
    import csv

    import yaml

    def labels() -> dict[tuple[str, str], str | None]:
        t = pd.concat(pd.read_parquet(p) for p in sorted((demo_repo / "data" / "splits").glob("*.parquet")))
        return {
            (s, i): (None if pd.isna(lab) else lab)
            for s, i, lab in zip(t["source"], t["id"], t["label"], strict=False)
        }

    before = labels()
    out = demo_repo / "pipeline" / "sources" / "reviewed"
    _run(["photoprep", "review", "export", "--by", "cluster", str(out)], demo_repo)
    rows = list(csv.DictReader((out / "review.csv").read_text(encoding="utf-8").splitlines()))
    images = out / "images"
    # The reviewer names each cluster after its majority label, merging the clusters of one class ...
    frame = pd.DataFrame(rows).assign(folder=lambda f: f["file"].str.split("/").str[1])
    majority = frame.groupby("folder")["label"].agg(lambda s: s.value_counts().index[0])
    for folder in sorted(images.iterdir()):
        target = images / majority[folder.name]
        target.mkdir(exist_ok=True)
        for f in folder.iterdir():
            f.rename(target / f.name)
        folder.rmdir()
    # ... moves five images of a 3 to 8 (a decision the pipeline must respect), and deletes five.
    threes = [r for r in rows if r["label"] == "3"]
    moved, deleted = threes[:5], threes[5:10]
    (images / "8").mkdir(exist_ok=True)
    for r in moved:
        name = r["file"].rsplit("/", 1)[1]
        next(images.glob(f"*/{name}")).rename(images / "8" / name)
    for r in deleted:
        next(images.glob(f"*/{r['file'].rsplit('/', 1)[1]}")).unlink()
    expected = {
        (r["source"], r["id"]): f.parent.name
        for r in rows
        for f in images.glob(f"*/{r['file'].rsplit('/', 1)[1]}")
    }

    params = yaml.safe_load((demo_repo / "params.yaml").read_text(encoding="utf-8"))
    params["sources"] = ["demo", "reviewed"]
    (demo_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    out_text = _run(["dvc", "repro", "split"], demo_repo)
    assert "Running stage 'download@reviewed'" in out_text
    after = labels()

    assert set(after) == set(before), "each reviewed image is an exact copy of one the dataset holds"
    assert len(expected) == len(rows) - len(deleted)
    assert {key: after[key] for key in expected} == expected
    assert all(after[(r["source"], r["id"])] == "8" for r in moved)
    assert all(after[(r["source"], r["id"])] == "3" for r in deleted), "a deleted file keeps the old label"


def _standin_weights(root: Path) -> bytes:
    """Weights the test makes, as the hub would serve them: timm's test ResNet trained briefly on
    other drawings of the digits (the stand-in for ImageNet), saved as safetensors."""
    import torch
    from safetensors.torch import save
    from test_train import make_workspace

    from photoprep.core.layout import Layout
    from photoprep.core.params import TrainParams
    from photoprep.learn import train
    from photoprep.learn.data import load_data

    make_workspace(root, n=300, size=32, seed=1)
    p = TrainParams(model="timm/test_resnet", epochs=2, batch_size=32, device="cpu", normalize="pretrained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train.fit(load_data(p, Layout(root)), p)
    finally:
        torch.set_num_threads(threads)
    return bytes(save({k: v.contiguous() for k, v in result.state_dict.items()}))


def test_a_timm_backbone_fetched_from_the_hub_once_trains_clusters_and_verifies(
    demo_repo: Path, hub, tmp_path: Path
) -> None:
    """fetch -> train -> evaluate -> predict -> introspect -> embed -> cluster on the embeddings,
    through a loopback hub (HF_ENDPOINT); then nothing downloads again and verify passes. Last in
    this module: it leaves a timm model behind."""
    hub.add("timm/test_resnet.r160_in1k", "model.safetensors", _standin_weights(tmp_path / "b"))
    env = _env() | {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    changes = [
        "train.model=timm/test_resnet",
        "train.pretrained=imagenet",
        "train.head_epochs=1",
        "train.epochs=2",
        "cluster.input=embeddings",
    ]
    command = ["dvc", "exp", "run", *(a for c in changes for a in ("-S", c))]
    done = subprocess.run(command, cwd=demo_repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert {"pretrained", "train", "evaluate", "introspect", "predict", "embed", "cluster"} <= ran
    assert hub.downloads() == 1

    import yaml

    lock = yaml.safe_load((demo_repo / "dvc.lock").read_text())
    fetched = {o["path"]: o for o in lock["stages"]["pretrained"]["outs"]}["models/pretrained"]
    assert fetched["md5"].endswith(".dir") and fetched["nfiles"] == 2  # the weights' hash, versioned
    record = json.loads((demo_repo / "models" / "pretrained" / "pretrained.json").read_text())
    assert record["source"]["repo"] == "timm/test_resnet.r160_in1k"
    metrics = json.loads((demo_repo / "metrics" / "cluster.json").read_text())
    assert metrics["input"]["kind"] == "embeddings" and metrics["input"]["model"] == "timm/test_resnet"
    assert {"kmeans_features", "kmeans_cnn", "dec"} <= set(metrics["methods"])  # side by side
    tsne = pd.read_csv(demo_repo / "plots" / "tsne.csv")
    assert len(tsne) == len(pd.read_parquet(demo_repo / "data" / "splits" / "test.parquet"))

    _commit(demo_repo, "a timm backbone")
    assert "ok" in _run(["photoprep", "verify"], demo_repo)
    out = subprocess.run(
        ["dvc", "repro"], cwd=demo_repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "Running stage" not in out.stdout
    assert hub.downloads() == 1  # training, and every stage after the fetch, never download
