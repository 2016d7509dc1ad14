"""Pretrained weights: named by train.pretrained, fetched once from a (loopback) hub or a local
file, refused with one line when damaged, pickled or made for another architecture, and loaded
by training without a download."""

from __future__ import annotations

import hashlib
import io as stdio
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save
from test_train import make_workspace, one_thread, states_equal  # noqa: F401 (an autouse fixture)

from photoprep.core.errors import UserError
from photoprep.core.layout import Layout
from photoprep.core.params import TrainParams
from photoprep.learn import checkpoint, models, pretrained, train
from photoprep.learn.data import load_data
from photoprep.learn.models import Architecture

ARCH = "timm/test_resnet"  # timm's smallest ResNet (its registry's test model): fast on the CPU
HUB_ID = "timm/test_resnet.r160_in1k"  # what `imagenet` resolves to for it


def weights_of(model: str = ARCH, num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.build_model(Architecture.of(model, num_classes, (32, 32))).state_dict()


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return bytes(save({k: v.contiguous() for k, v in state.items()}))


def params(**changes) -> TrainParams:
    base = {"model": ARCH, "pretrained": "imagenet", "epochs": 1, "batch_size": 16, "device": "cpu"}
    return TrainParams.model_validate(base | changes)


@pytest.fixture
def project(tmp_path) -> Layout:
    paths = Layout(tmp_path / "project")
    paths.local_weights_dir.mkdir(parents=True)
    return paths


@pytest.fixture
def hub_endpoint(hub, monkeypatch, tmp_path):
    """``hub`` as huggingface_hub's endpoint in this process (its cache files kept in tmp_path)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
    return hub


# --------------------------------------------------------------------------- resolving


def test_imagenet_a_tag_a_hub_id_and_a_file_resolve_to_their_sources(project):
    assert pretrained.resolve(params(pretrained=None), project).kind == "none"
    imagenet = pretrained.resolve(params(), project)
    assert (imagenet.kind, imagenet.hub_id) == ("hub", HUB_ID)
    assert pretrained.resolve(params(model="timm/resnet18", pretrained="a1_in1k"), project).hub_id == (
        "timm/resnet18.a1_in1k"
    )
    assert pretrained.resolve(params(pretrained="hf-hub:me/mine"), project).hub_id == "me/mine"
    (project.local_weights_dir / "w.safetensors").write_bytes(b"x")
    local = pretrained.resolve(params(pretrained=str(project.local_weights_dir / "w.safetensors")), project)
    assert local.kind == "file" and local.path == (project.local_weights_dir / "w.safetensors").resolve()


def test_an_unknown_tag_names_the_tags_there_are(project):
    with pytest.raises(UserError, match=r"no pretrained weights 'resnet18\.nope'.*a1_in1k"):
        pretrained.resolve(params(model="timm/resnet18", pretrained="nope"), project)


def test_a_file_outside_pipeline_pretrained_is_not_read(project, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(safetensors_bytes(weights_of()))
    with pytest.raises(UserError, match=r"outside pipeline/pretrained/"):
        pretrained.resolve(params(pretrained=str(outside)), project)
    link = project.local_weights_dir / "link.safetensors"
    link.symlink_to(outside)
    with pytest.raises(UserError, match=r"outside pipeline/pretrained/"):
        pretrained.resolve(params(pretrained=str(link)), project)
    with pytest.raises(UserError, match=r"not found"):
        pretrained.resolve(params(pretrained=str(project.local_weights_dir / "missing.pth")), project)


def test_pretrained_weights_need_a_timm_model():
    with pytest.raises(ValueError, match=r"pretrained: convnet has no pretrained weights"):
        TrainParams(model="convnet", pretrained="imagenet")


# --------------------------------------------------------------------------- hostile files


def _fetch_local(project: Layout, name: str, data: bytes, model: str = ARCH) -> dict:
    path = project.local_weights_dir / name
    path.write_bytes(data)
    source = pretrained.resolve(params(model=model, pretrained=str(path)), project)
    return pretrained.fetch(source, project)


class _Payload:
    """A pickle that runs code when unpickled: it would create the file named."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_truncated_safetensors_file_is_one_line(project):
    whole = safetensors_bytes(weights_of())
    with pytest.raises(UserError, match=r"cut\.safetensors: damaged or truncated safetensors file"):
        _fetch_local(project, "cut.safetensors", whole[: len(whole) // 2])
    assert not project.pretrained_weights.exists()


def test_a_pickle_named_safetensors_is_refused_without_unpickling_it(project, tmp_path):
    marker = tmp_path / "code-ran"
    with pytest.raises(UserError, match=r"not a safetensors file but a pickle"):
        _fetch_local(project, "evil.safetensors", pickle.dumps(_Payload(marker)))
    buffer = stdio.BytesIO()
    torch.save(weights_of(), buffer)  # torch.save's zip archive, named .safetensors
    with pytest.raises(UserError, match=r"not a safetensors file but a pickle"):
        _fetch_local(project, "zip.safetensors", buffer.getvalue())
    assert not marker.exists()


def test_a_pth_that_pickles_code_is_refused_and_the_code_never_runs(project, tmp_path):
    marker = tmp_path / "code-ran"
    buffer = stdio.BytesIO()
    torch.save({"state_dict": weights_of(), "extra": _Payload(marker)}, buffer)
    with pytest.raises(UserError, match=r"evil\.pth: refused: it pickles more than tensors"):
        _fetch_local(project, "evil.pth", buffer.getvalue())
    assert not marker.exists()


def test_weights_of_another_architecture_are_one_line(project):
    with pytest.raises(UserError, match=r"weights of another architecture than timm/test_resnet: \d+ of \d+"):
        _fetch_local(project, "resnet18.safetensors", safetensors_bytes(weights_of("timm/resnet18")))
    convnet = models.build_model(Architecture.of("convnet", 10, (32, 32), width=8)).state_dict()
    with pytest.raises(UserError, match=r"another architecture"):
        _fetch_local(project, "convnet.safetensors", safetensors_bytes(convnet))


def test_an_empty_file_and_a_file_of_no_tensors_are_one_line(project):
    with pytest.raises(UserError, match=r"empty\.pth: empty file"):
        _fetch_local(project, "empty.pth", b"")
    buffer = stdio.BytesIO()
    torch.save({"epoch": 3}, buffer)
    with pytest.raises(UserError, match=r"holds no state dict"):
        _fetch_local(project, "meta.pth", buffer.getvalue())


# --------------------------------------------------------------------------- fetching


def test_a_local_file_is_checked_and_stored_as_safetensors_with_its_hash(project):
    state = weights_of(num_classes=7)  # another head: timm leaves it out, the rest must fit
    buffer = stdio.BytesIO()
    torch.save({"state_dict": state}, buffer)
    record = _fetch_local(project, "mine.pth", buffer.getvalue())
    assert record["source"] == {"kind": "file", "path": "pipeline/pretrained/mine.pth"}
    assert record["sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    stored = pretrained.read_weights(project.pretrained_weights)
    assert states_equal(stored, state)
    assert record["data_config"]["input_size"] == [160, 160]  # test_resnet's own pretrained config


def test_the_hub_weights_are_fetched_once_into_the_project(project, hub_endpoint, tmp_path):
    data = safetensors_bytes(weights_of())
    hub_endpoint.add(HUB_ID, "model.safetensors", data)
    record = pretrained.fetch(pretrained.resolve(params(), project), project)
    assert record["source"] == {
        "kind": "hub",
        "repo": HUB_ID,
        "file": "model.safetensors",
        "revision": hub_endpoint.COMMIT,
    }
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert hub_endpoint.downloads() == 1
    assert sorted(p.name for p in project.pretrained_dir.iterdir()) == [
        "pretrained.json",
        "weights.safetensors",
    ]
    loaded = pretrained.load_fetched(params(), project)
    assert loaded is not None and states_equal(loaded.state_dict, weights_of())
    assert hub_endpoint.downloads() == 1  # reading what was fetched downloads nothing


def test_a_hub_repository_without_safetensors_gives_its_pytorch_bin(project, hub_endpoint):
    buffer = stdio.BytesIO()
    torch.save(weights_of(), buffer)
    hub_endpoint.add(HUB_ID, "pytorch_model.bin", buffer.getvalue())
    record = pretrained.fetch(pretrained.resolve(params(), project), project)
    assert record["source"]["file"] == "pytorch_model.bin"


def test_a_missing_repository_is_one_line(project, hub_endpoint):
    # (A hub that does not answer is retried by huggingface_hub for about 23 s, then one line too.)
    with pytest.raises(UserError, match=rf"the hub at {hub_endpoint.url} has no repository {HUB_ID}"):
        pretrained.fetch(pretrained.resolve(params(), project), project)


def test_weights_fetched_for_other_params_or_changed_since_are_refused(project):
    _fetch_local(project, "mine.safetensors", safetensors_bytes(weights_of()))
    with pytest.raises(UserError, match=r"holds weights for timm/test_resnet / .*mine\.safetensors, not"):
        pretrained.load_fetched(params(), project)
    p = params(pretrained=str(project.local_weights_dir / "mine.safetensors"))
    assert pretrained.load_fetched(p, project) is not None
    project.pretrained_weights.write_bytes(safetensors_bytes(weights_of(seed=1)))
    with pytest.raises(UserError, match=r"does not match its hash"):
        pretrained.load_fetched(p, project)


# --------------------------------------------------------------------------- training from them


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("digits"), n=200, size=32)


def test_training_starts_from_the_fetched_weights_and_records_them(digits, project, tmp_path):
    start = weights_of(num_classes=1000, seed=3)
    path = project.local_weights_dir / "b.safetensors"
    path.write_bytes(safetensors_bytes(start))
    p = params(pretrained=str(path), epochs=2, head_epochs=1, image_size=(32, 32))
    pretrained.fetch(pretrained.resolve(p, project), project)
    fetched = pretrained.load_fetched(p, project)
    data = load_data(p, Layout(digits))

    class Stop(Exception):
        pass

    def after_the_head_epoch(record):
        raise Stop

    with pytest.raises(Stop):
        train.fit(data, p, tmp_path / "cut", on_epoch=after_the_head_epoch, pretrained=fetched)
    head_epoch = checkpoint.read_checkpoint(tmp_path / "cut/last.pt")["model"]
    backbone = [k for k in head_epoch if not k.startswith("fc.")]
    assert backbone and all(torch.equal(head_epoch[k], start[k]) for k in backbone)  # as fetched
    result = train.fit(data, p, pretrained=fetched)
    assert result.meta["pretrained"]["source"]["path"] == "pipeline/pretrained/b.safetensors"
    assert result.meta["normalization"]["kind"] == "pretrained"  # auto: the weights' mean and std
    assert result.meta["normalization"]["mean"] == fetched.data_config["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(UserError, match=r"was not fetched"):
        train.fit(data, p)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_weights_photoprep_saved_carry_their_data_config_and_auto_follows_it(digits, project):
    path = project.local_weights_dir / "own.safetensors"
    config = {"input_size": [32, 32], "mean": [0.0] * 3, "std": [1.0] * 3, "normalize": "image"}
    pretrained.save_weights(weights_of(), path, config | {"interpolation": None})
    p = params(pretrained=str(path), image_size="auto")
    record = pretrained.fetch(pretrained.resolve(p, project), project)
    assert record["data_config"] == config | {"interpolation": None}
    fetched = pretrained.load_fetched(p, project)
    kind, prep = train.input_prep(
        p, load_data(p, Layout(digits)), train.architecture_for(p, 10, (1, 32, 32, 3), fetched), fetched
    )
    assert kind == "image" and prep.per_image and prep.size == (32, 32)  # as the weights were trained
    timm_cfg = pretrained.fetch(pretrained.resolve(params(pretrained=str(_plain(project))), project), project)
    assert timm_cfg["data_config"]["normalize"] == "pretrained"  # no metadata: timm's config


def _plain(project: Layout) -> Path:
    path = project.local_weights_dir / "plain.safetensors"
    path.write_bytes(safetensors_bytes(weights_of()))
    return path
