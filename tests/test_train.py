"""Training learns, is bit-reproducible on the CPU, resumes, stops early, freezes and transfers,
and runs the fine-tuning recipe (head first, layer decay, mixup, timm's schedules).

The data is sklearn's digits drawn as small RGB photos (a coloured glyph on a smooth colour
gradient, shifted a little), written as the earlier stages would: the images' chunks, the split
tables, ``reports/splits.json`` and the features' chunks. ``make_workspace`` is shared with the
evaluate and verify tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from photoprep.core import chunked, io
from photoprep.core.errors import UserError
from photoprep.core.layout import Layout
from photoprep.core.params import FeatureParams, SplitParams, TrainParams
from photoprep.dataset.split import assign_splits, split_report
from photoprep.learn import checkpoint, live, optim, train
from photoprep.learn.data import (
    Batches,
    Prep,
    Rows,
    augment_images,
    draw_augmentation,
    input_stats,
    load_data,
)

# --------------------------------------------------------------------------- data


def render_digits(n: int | None = None, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 N x size x size x 3 photos, and their labels (0-9).

    Each glyph is scaled to 55-75 % of the frame, tinted with a colour far from its background
    (a linear gradient between two random colours at a random angle), shifted up to 8 % of the
    frame and overlaid with mild noise: no two images share colours or position.
    """
    digits = load_digits()
    glyphs = digits.images[:n] / 16.0
    labels = digits.target[:n].astype(np.int64)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((len(glyphs), size, size, 3), np.uint8)
    for i, glyph in enumerate(glyphs):
        c0, c1 = rng.uniform(0, 255, (2, 3))
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        frame = c0 + (c1 - c0) * t[..., None]
        mean_bg = frame.reshape(-1, 3).mean(0)
        ink = rng.uniform(0, 255, 3)
        while np.linalg.norm(ink - mean_bg) < 150:
            ink = rng.uniform(0, 255, 3)
        side = int(rng.integers(int(size * 0.55), int(size * 0.75) + 1))
        alpha = (
            np.asarray(
                Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR),
                np.float64,
            )[..., None]
            / 255.0
        )
        jitter = int(size * 0.08)
        top = (size - side) // 2 + int(rng.integers(-jitter, jitter + 1))
        left = (size - side) // 2 + int(rng.integers(-jitter, jitter + 1))
        top, left = min(max(top, 0), size - side), min(max(left, 0), size - side)
        patch = frame[top : top + side, left : left + side]
        frame[top : top + side, left : left + side] = patch * (1 - alpha) + ink * alpha
        frame += rng.normal(0, 4, frame.shape)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out, labels


def make_workspace(
    root: Path, n: int | None = 600, size: int = 32, features: bool = False, seed: int = 0
) -> Path:
    """A folder laid out as the pipeline leaves it before the train stage, built from digits
    (drawn with ``seed``: another seed draws the same digits on other backgrounds)."""
    pixels, labels = render_digits(n, size, seed)
    table = pd.DataFrame(
        {
            "source": "digits",
            "id": [f"{i:05d}" for i in range(len(labels))],
            "sha256": [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels],
            "label": [str(v) for v in labels],
        }
    )
    (root / "data/processed").mkdir(parents=True, exist_ok=True)
    chunked.save(root / "data/processed/images", pixels)
    io.write_table(table.assign(row=range(len(table))), root / "data/processed/images.parquet")
    result = assign_splits(table, SplitParams())
    for name in ("train", "val", "test", "unlabeled"):
        part = result.table[result.table["split"] == name].reset_index(drop=True)
        io.write_table(part, root / f"data/splits/{name}.parquet")
    io.write_json(split_report(result), root / "reports/splits.json")
    if features:
        from photoprep.images.features import compute_features

        matrix, info = compute_features(pixels, FeatureParams())
        (root / "data/features").mkdir(parents=True, exist_ok=True)
        chunked.save(root / "data/features/features", matrix.astype(np.float32))
        io.write_json(info, root / "data/features/features.json")
    return root


def tiny(**changes) -> TrainParams:
    """Fast CPU settings: the default model (convnet) at width 8, a few epochs, small batches,
    no dropout or label smoothing (they slow down learning this small)."""
    base = {
        "model": "convnet",
        "width": 8,
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.02,
        "device": "cpu",
        "early_stopping": 0,
        "dropout": 0.0,
        "label_smoothing": 0.0,
    }
    return TrainParams.model_validate(base | changes)


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: on a busy 2-core machine, two threads spin-waiting on each other
    can make a tiny training run 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("digits"), n=600, size=32, features=True)


@pytest.fixture(scope="module")
def data(workspace):
    return load_data(tiny(), Layout(workspace))


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- tests


def test_splits_load_as_uint8_images_with_class_indices(data):
    assert data.kind == "images"
    assert isinstance(data.train.inputs, Rows)  # memory-mapped rows, read when a batch needs them
    assert data.classes == [str(d) for d in range(10)]
    assert data.train.inputs.dtype == np.uint8 and data.train.inputs.shape[1:] == (32, 32, 3)
    assert len(data.train) + len(data.val) > 0.7 * 600
    assert set(np.unique(data.train.labels)) == set(range(10))


def test_a_stale_split_table_is_a_user_error(workspace, tmp_path):
    stale = Layout(tmp_path / "project")
    shutil.copytree(workspace, stale.root)
    report_ = json.loads(stale.splits_report.read_text())
    report_["fingerprints"]["val"] = "0" * 64
    stale.splits_report.write_text(json.dumps(report_))
    with pytest.raises(UserError, match="does not match its fingerprint"):
        load_data(tiny(), stale)


def test_training_learns_digits_well_above_chance(data):
    result = train.fit(data, tiny(epochs=20, lr=0.01))
    best = result.meta["best_val"]["accuracy"]
    assert best >= 0.7, result.history  # chance is 0.1; seeds 0-3 give 0.83-0.88
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert result.meta["epochs_run"] == 20


def test_mlp_learns_on_features(workspace):
    p = tiny(model="mlp", width=64, epochs=8, lr=0.003)
    feats = load_data(p, Layout(workspace))
    assert feats.kind == "features" and feats.train.inputs.dtype == np.float32
    result = train.fit(feats, p)
    assert result.meta["best_val"]["accuracy"] >= 0.7
    assert result.meta["in_features"] == feats.train.inputs.shape[1]


def test_mlp_on_pixels_reads_images_and_round_trips_through_the_model_file(workspace, tmp_path):
    p = tiny(model="mlp", input="images", width=64, epochs=8, lr=0.003, image_size=(16, 16), augment=[])
    pixels = load_data(p, Layout(workspace))
    assert pixels.kind == "images" and pixels.train.inputs.dtype == np.uint8
    result = train.fit(pixels, p)
    assert result.meta["input"] == "images" and result.meta["in_features"] == 3 * 16 * 16
    assert result.meta["params"]["input"] == "images"
    # It learns the train split (chance is 0.1); pixels of 420 images on random backgrounds
    # overfit, which is what the README's studies measure on the demo.
    assert result.history[-1]["train_accuracy"] >= 0.4, result.history
    checkpoint.save_model(result.state_dict, result.meta, tmp_path / "model.pt")
    model, _ = checkpoint.load_model(tmp_path / "model.pt")
    assert model.eval()(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_input_features_needs_the_mlp_and_the_default_is_not_recorded():
    with pytest.raises(ValueError, match=r"input: features needs train\.model: mlp"):
        tiny(input="features")
    assert "input" not in tiny().recorded()  # model files of the default params keep their bytes
    assert tiny(model="mlp", input="images").recorded()["input"] == "images"


def test_two_cpu_runs_with_one_seed_give_identical_weights_and_metrics(data, tmp_path):
    p = tiny(epochs=2, dropout=0.2)  # dropout, shuffles and augmentation all draw random numbers
    a, b = train.fit(data, p), train.fit(data, p)
    assert states_equal(a.state_dict, b.state_dict)
    assert a.history == b.history
    checkpoint.save_model(a.state_dict, a.meta, tmp_path / "a.pt")
    checkpoint.save_model(b.state_dict, b.meta, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    c = train.fit(data, tiny(epochs=2, dropout=0.2, seed=1))
    assert not states_equal(a.state_dict, c.state_dict)


def test_resume_continues_from_the_last_checkpoint_to_the_same_weights(data, tmp_path):
    p = tiny(epochs=4, augment=["translate"])
    whole = train.fit(data, p, tmp_path / "whole")

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.fit(data, p, tmp_path / "cut", on_epoch=stop_after_two)
    assert len(checkpoint.read_checkpoint(tmp_path / "cut/last.pt")["history"]) == 2

    seen = []
    again = tiny(epochs=4, augment=["translate"], resume=True)
    resumed = train.fit(data, again, tmp_path / "cut", on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [0, 1, 2, 3]  # two replayed, two trained
    assert resumed.perf["epochs_this_run"] == 2
    assert resumed.history == whole.history
    assert states_equal(resumed.state_dict, whole.state_dict)


def test_a_checkpoint_of_other_params_is_not_resumed(data, tmp_path, capsys):
    train.fit(data, tiny(epochs=1), tmp_path)
    result = train.fit(data, tiny(epochs=1, lr=0.05, resume=True), tmp_path)
    assert "other params or data" in capsys.readouterr().err
    assert result.perf["epochs_this_run"] == 1


def test_early_stopping_ends_training_when_val_stops_improving(data, tmp_path, monkeypatch):
    # Scripted val scores: the best comes at epoch 1, then two epochs without a better one.
    scores = iter([(1.0, 0.5), (0.8, 0.7), (0.9, 0.6), (0.85, 0.7), (0.1, 0.99)])
    monkeypatch.setattr(train, "evaluate_split", lambda *args: next(scores))
    result = train.fit(data, tiny(epochs=5, early_stopping=2, monitor="val_accuracy"), tmp_path)
    assert result.meta["stopped_early"]
    assert result.meta["epochs_run"] == 4  # epoch 3 ties on accuracy with a higher loss: not better
    assert result.meta["best_epoch"] == 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1
    assert states_equal(best["model"], result.state_dict)


def test_early_stopping_on_val_loss(data, monkeypatch):
    scores = iter([(1.0, 0.5), (0.8, 0.4), (0.9, 0.9), (0.85, 0.9), (0.1, 0.99)])
    monkeypatch.setattr(train, "evaluate_split", lambda *args: next(scores))
    result = train.fit(data, tiny(epochs=5, early_stopping=2, monitor="val_loss"))
    assert result.meta["best_epoch"] == 1 and result.meta["epochs_run"] == 4


def test_model_file_loads_with_weights_only_and_carries_plain_metadata(data, tmp_path):
    result = train.fit(data, tiny(epochs=1))
    checkpoint.save_model(result.state_dict, result.meta, tmp_path / "model.pt")
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    meta = blob["meta"]
    assert meta["classes"] == data.classes
    assert meta["input_size"] == [32, 32]
    assert len(meta["normalization"]["mean"]) == 3
    assert meta["params"]["model"] == "convnet"
    assert meta["fingerprints"]["train"] == data.train.fingerprint
    assert len(meta["fingerprints"]["test"]) == 64
    json.dumps(meta)  # plain types only
    model, meta2 = checkpoint.load_model(tmp_path / "model.pt")
    assert meta2 == meta
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_init_from_a_local_checkpoint_then_freeze_keeps_frozen_weights(data, tmp_path):
    first = train.fit(data, tiny(model="smallcnn", epochs=2))
    checkpoint.save_model(first.state_dict, first.meta, tmp_path / "base.pt")
    p = tiny(model="smallcnn", epochs=1, init_from=str(tmp_path / "base.pt"), freeze=2)
    second = train.fit(data, p)
    for name, tensor in second.state_dict.items():
        if name.startswith(("blocks.0.", "blocks.1.")):  # both conv blocks, BN statistics included
            assert torch.equal(tensor, first.state_dict[name]), name
    assert not torch.equal(second.state_dict["blocks.2.2.weight"], first.state_dict["blocks.2.2.weight"])
    assert second.meta["transfer"]["loaded"] == len(first.state_dict)
    assert second.meta["frozen_parameters"] > 0


def test_init_from_a_missing_file_is_a_user_error(data, tmp_path):
    with pytest.raises(UserError, match="not found"):
        train.fit(data, tiny(epochs=1, init_from=str(tmp_path / "nope.pt")))


def test_auto_device_without_cuda_warns_once_and_uses_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.training_device("auto").type == "cpu"
    assert capsys.readouterr().err.count("warning") == 1
    with pytest.raises(UserError, match="no CUDA device"):
        train.training_device("cuda")


def augmented(x, augment, shift_px, seed):
    draws = draw_augmentation(len(x), augment, shift_px, torch.Generator().manual_seed(seed))
    return augment_images(x, draws)


def test_augmentation_runs_on_uint8_and_is_seeded():
    x = (torch.arange(4 * 6 * 6 * 3).remainder(250) + 1).to(torch.uint8).view(4, 6, 6, 3)  # no zero
    a, b = augmented(x, ("translate",), 2, 0), augmented(x, ("translate",), 2, 0)
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x) and (a != 0).all()  # shifted; edges repeated, never black
    assert (augmented(x, ("crop",), 5, 3) == 0).any()  # black fill where the crop left the frame
    assert torch.equal(augmented(x, ("translate",), 0, 0), x)


def test_flip_mirrors_and_colour_permutes_or_inverts_channels():
    x = torch.randint(0, 256, (64, 5, 7, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    draws = draw_augmentation(64, ("flip", "colour"), 0, torch.Generator().manual_seed(1))
    out = augment_images(x, draws)
    for i in range(64):
        expected = x[i].flip(1) if draws["flip"][i] else x[i]
        expected = expected[..., draws["channels"][i]]
        expected = 255 - expected if draws["invert"][i] else expected
        assert torch.equal(out[i], expected)
    assert 10 < int(draws["flip"].sum()) < 54 and len(set(draws["channels"][:, 0].tolist())) == 3


def test_batches_normalise_to_channels_last_float(data):
    mean, std = input_stats(data.train.inputs)
    cpu = torch.device("cpu")
    b = Batches(data.train.inputs, data.train.labels, cpu, Prep(mean, std, channels_last=True))
    x, y = next(b.in_order(64))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3
    assert torch.equal(y, torch.from_numpy(data.train.labels[:64]))


def test_staged_batches_equal_resident_batches(data):
    """The path for a split too big to hold (read from the memory map into two host buffers in turn)."""
    mean, std = input_stats(data.train.inputs)
    args = (data.train.inputs, data.train.labels, torch.device("cpu"), Prep(mean, std))
    resident, staged = Batches(*args, resident=True), Batches(*args, resident=False)
    assert not staged.resident
    a = list(resident.epoch(48, torch.Generator().manual_seed(5), ("translate", "colour"), 3))
    b = list(staged.epoch(48, torch.Generator().manual_seed(5), ("translate", "colour"), 3))
    assert len(a) == len(b) == len(data.train) // 48
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=False))


@pytest.mark.parametrize("schedule", ["none", "step", "cosine", "onecycle"])
def test_learning_rate_schedules(schedule):
    p = tiny(schedule=schedule, lr=0.1, step_size=2, gamma=0.5, epochs=4)
    net = torch.nn.Linear(3, 2)
    schedule_ = optim.Schedule(p, optim.make_optimizer(net, p, torch.device("cpu")), steps_per_epoch=10)
    lrs = [schedule_.at(s) for s in range(40)]
    assert max(lrs) <= 0.1 + 1e-12
    if schedule == "none":
        assert set(lrs) == {0.1}
    if schedule == "step":
        assert lrs[0] == 0.1 and lrs[20] == pytest.approx(0.05)
    if schedule == "cosine":
        assert lrs[0] == 0.1 and lrs[-1] < 0.001
    if schedule == "onecycle":
        assert lrs[0] < 0.01 and max(lrs) == pytest.approx(0.1, rel=1e-3) and lrs[-1] < 0.001


def test_layer_decay_and_the_backbone_scale_give_each_group_its_share_of_the_rate():
    from photoprep.learn import models
    from photoprep.learn.models import Architecture

    model = models.build_model(Architecture.of("timm/resnet18", 4, (32, 32)))
    p = tiny(model="timm/resnet18", layer_decay=0.5, backbone_lr_scale=0.1, lr=0.01, schedule="none")
    optimizer = optim.make_optimizer(model, p, torch.device("cpu"))
    optim.Schedule(p, optimizer, steps_per_epoch=1)
    head = {id(t) for t in model.get_classifier().parameters()}
    by_kind: dict[bool, list[float]] = {True: [], False: []}
    for group in optimizer.param_groups:
        in_head = {id(t) in head for t in group["params"]}
        assert len(in_head) == 1  # no group mixes the classifier with the rest
        by_kind[in_head.pop()].append(group["lr"])
    assert set(by_kind[True]) == {0.01}
    assert max(by_kind[False]) <= 0.01 * 0.1 * 0.5 + 1e-12  # backbone scale times at least one decay
    assert min(by_kind[False]) < max(by_kind[False])  # deeper groups learn slower
    assert optimizer.defaults.get("fused") is True  # AdamW fused: the same bits on any CPU


def test_head_epochs_train_the_classifier_alone_then_every_layer(data, tmp_path):
    from photoprep.learn import models

    p = tiny(epochs=2, head_epochs=1)
    torch.manual_seed(p.seed)  # the seeded network fit starts from
    start = models.build_model(
        train.architecture_for(p, len(data.classes), data.train.inputs.shape)
    ).state_dict()

    class Stop(Exception):
        pass

    def after_the_head_epoch(record):
        raise Stop

    with pytest.raises(Stop):
        train.fit(data, p, tmp_path / "cut", on_epoch=after_the_head_epoch)
    head_epoch = checkpoint.read_checkpoint(tmp_path / "cut/last.pt")["model"]
    classifier = ("blocks.4.2.weight", "blocks.4.2.bias")  # the convnet's last linear layer
    for name, tensor in head_epoch.items():
        moved = not torch.equal(tensor, start[name])
        assert moved == (name in classifier), name  # batch norm statistics included
    whole = train.fit(data, p)
    assert not torch.equal(whole.state_dict["blocks.0.0.weight"], start["blocks.0.0.weight"])


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}])
def test_mixup_and_cutmix_train_reproducibly(data, mix):
    p = tiny(epochs=2, **mix)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = train.fit(data, p)
    assert (np.random.get_state()[1] == before).all()  # mixup drew from numpy's generator, restored after
    b = train.fit(data, p)
    assert states_equal(a.state_dict, b.state_dict) and a.history == b.history
    plain = train.fit(data, tiny(epochs=2))
    assert not states_equal(a.state_dict, plain.state_dict)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaled"])
def test_the_amp_step_runs_on_the_cpu_where_torch_allows_it(data, amp):
    """The CUDA step's code path (autocast; fp16 with a gradient scaler), run on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10)
    )
    model = model.to(memory_format=torch.channels_last)
    p = tiny(optimizer="sgd", lr=0.1)
    optimizer = optim.make_optimizer(model, p, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=amp == torch.float16)
    prep = Prep([0.5] * 3, [0.25] * 3, channels_last=True)
    batches = Batches(data.train.inputs, data.train.labels, torch.device("cpu"), prep)
    x, y = next(batches.in_order(32))
    before = [t.detach().clone() for t in model.parameters()]
    out, loss = train.train_step(model, x, y, optimizer, scaler, torch.nn.CrossEntropyLoss(), amp)
    assert out.dtype == amp and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if scaler.is_enabled():
        assert scaler.get_scale() == 65536.0  # no inf or nan in the scaled gradients: the step was taken


def test_dvclive_log_writes_learning_curves_and_no_dvc_yaml(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = live.LiveLog("dvclive")
    result = train.fit(data, tiny(epochs=2), on_epoch=log)
    log.close(result)
    curves = tmp_path / "dvclive/plots/metrics"
    for name in ("train/loss.tsv", "train/accuracy.tsv", "val/loss.tsv", "val/accuracy.tsv", "lr.tsv"):
        rows = (curves / name).read_text().splitlines()
        assert rows[0].startswith("step\t") and len(rows) == 3, name
    summary = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert summary["best"]["epoch"] == result.meta["best_epoch"]
    assert not list(tmp_path.rglob("dvc.yaml"))
