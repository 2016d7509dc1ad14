"""The introspect stage: t-SNE of the penultimate layer, first-layer filters, top-k predictions."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_evaluate import run_stage, shared_pipeline
from test_train import one_thread  # noqa: F401 (an autouse fixture)

from photoprep.learn import embed, introspect, models
from photoprep.learn.models import Architecture

OUTPUTS = (
    "plots/tsne.csv",
    "reports/tsne.png",
    "reports/filters.png",
    "reports/top5.png",
    "reports/top5.csv",
)


@pytest.fixture(scope="module")
def looked(tmp_path_factory) -> tuple[Path, float]:
    """A copy of the trained and evaluated workspace, with the introspect stage run once, and
    the CPU seconds it took."""
    root = tmp_path_factory.mktemp("introspect") / "ws"
    shutil.copytree(shared_pipeline(tmp_path_factory), root)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run_stage("introspect", root)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return root, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def test_the_stage_writes_every_file_and_agrees_with_evaluate(looked):
    ws, cpu_seconds = looked
    assert all((ws / p).stat().st_size > 0 for p in OUTPUTS)
    # CPU time, not wall clock (this machine is shared): imports included, ~15 s here.
    assert cpu_seconds < 40, cpu_seconds
    tsne = pd.read_csv(ws / "plots/tsne.csv", dtype={"actual": str, "predicted": str, "id": str})
    test = pd.read_parquet(ws / "data/splits/test.parquet")
    confusion = pd.read_csv(ws / "plots/confusion.csv", dtype=str)
    assert list(tsne.columns) == ["x", "y", "actual", "predicted", "id"]
    assert list(tsne["id"]) == list(test["id"].astype(str))
    assert list(tsne["actual"]) == list(confusion["actual"])
    assert list(tsne["predicted"]) == list(confusion["predicted"]), "the same model, the same predictions"
    assert tsne[["x", "y"]].std().min() > 1.0, "a spread-out map, not a point"


def test_the_map_keeps_what_the_model_tells_apart_apart(looked):
    """Neighbours on the map share the model's predicted class far more often than chance: the
    map is of the embedding the classifier reads (the test model is weak: 10 tiny epochs)."""
    ws, _ = looked
    tsne = pd.read_csv(ws / "plots/tsne.csv", dtype={"predicted": str})
    xy = tsne[["x", "y"]].to_numpy()
    dist = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argsort(1)[:, :5]
    predicted = tsne["predicted"].to_numpy()
    agree = (predicted[nearest] == predicted[:, None]).mean()
    shuffled = np.random.default_rng(0).permutation(predicted)
    baseline = (shuffled[nearest] == shuffled[:, None]).mean()
    assert agree > 2 * baseline, (agree, baseline)  # 0.49 against 0.14 here


def test_top5_lists_each_class_with_sorted_probabilities(looked):
    ws, _ = looked
    top = pd.read_csv(ws / "reports/top5.csv", dtype=str)
    assert list(top["actual"].value_counts().sort_index()) == [4] * 10  # introspect.per_class
    probs = top[[f"probability_{j}" for j in range(1, 6)]].astype(float).to_numpy()
    assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(1) <= 1 + 1e-3).all()
    tsne = pd.read_csv(ws / "plots/tsne.csv", dtype=str).set_index("id")
    assert list(top["class_1"]) == list(tsne.loc[top["id"], "predicted"])
    with Image.open(ws / "reports/top5.png") as sheet:
        assert sheet.height > 10 * 64  # a row of thumbnails per class


def test_a_second_run_is_byte_identical(looked):
    ws, _ = looked
    before = {p: (ws / p).read_bytes() for p in OUTPUTS}
    run_stage("introspect", ws)
    assert {p: (ws / p).read_bytes() for p in OUTPUTS} == before


def test_filters_are_the_first_convolution_scaled_to_their_range():
    model = models.build_model(Architecture.of("convnet", 10, (32, 32), width=8, depth=2))
    filters = introspect.first_layer_filters(model, {"input": "images"}, count=5)
    assert filters is not None and filters.shape == (5, 3, 3, 3) and filters.dtype == np.uint8
    assert (filters.reshape(5, -1).min(1) == 0).all() and (filters.reshape(5, -1).max(1) == 255).all()
    weight = model.blocks[0][0].weight.detach()[0]
    assert np.argmax(filters[0]) == np.argmax(weight.permute(1, 2, 0).numpy())


def test_an_mlp_on_pixels_shows_its_first_weights_and_one_on_features_shows_none(tmp_path):
    pixels = models.build_model(Architecture.of("mlp", 10, (16, 16), width=12))
    filters = introspect.first_layer_filters(pixels, {"input": "images", "input_size": [16, 16]}, count=64)
    assert filters is not None and filters.shape == (12, 16, 16, 3)
    feats = models.build_model(Architecture.of("mlp", 10, in_features=40, width=12))
    assert introspect.first_layer_filters(feats, {"input": "features", "input_size": None}, 64) is None
    introspect.draw_filters(None, tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0


def test_embeddings_are_the_input_of_the_last_linear_layer():
    torch.manual_seed(0)
    model = models.build_model(Architecture.of("convnet", 3, (16, 16), width=4, depth=2))
    meta = {
        "normalization": {"kind": "image", "mean": [0.5] * 3, "std": [0.25] * 3},
        "input_size": [16, 16],
        "architecture": {"num_classes": 3},
    }
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    emb, probs = embed.forward(model, meta, images, batch_size=3)
    assert probs is not None
    assert emb.shape == (7, 8) and probs.shape == (7, 3)  # width 4 doubled once: 8 channels
    head = model.blocks[-1][-1]
    logits = head(torch.from_numpy(emb)).detach()
    assert np.allclose(torch.softmax(logits, 1).numpy(), probs, atol=1e-5)


def test_a_timm_model_embeds_its_pooled_features_and_a_headless_backbone_its_output():
    torch.manual_seed(0)
    arch = Architecture.of("timm/resnet18", 3, (32, 32))
    model = models.build_model(arch).eval()
    meta = {
        "normalization": {"kind": "pretrained", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "input_size": [32, 32],
        "interpolation": "bicubic",
        "architecture": arch.to_dict(),
    }
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    emb, probs = embed.forward(model, meta, images)
    assert emb.shape == (5, 512) and probs is not None and probs.shape == (5, 3)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
        x = (x / 255 - torch.tensor(meta["normalization"]["mean"]).view(1, 3, 1, 1)) / torch.tensor(
            meta["normalization"]["std"]
        ).view(1, 3, 1, 1)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert np.allclose(emb, pooled.numpy(), atol=1e-4)
    headless = models.build_model(Architecture.of("timm/resnet18", 0, (32, 32))).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    same, none = embed.forward(headless, meta | {"architecture": {"num_classes": 0}}, images)
    assert none is None and np.allclose(same, emb, atol=1e-5)
