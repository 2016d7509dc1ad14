"""Every model builds from plain arguments and classifies images of 32, 64 and 96 px."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from photoprep.learn import models


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("name", models.IMAGE_MODELS)
def test_each_image_model_builds_and_runs_forward_at_small_sizes(name, size):
    torch.manual_seed(0)
    model = models.build_model(name, 7, (size, size), width=8)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_non_square_input_works():
    model = models.build_model("resnet", 3, (48, 80), width=8).eval()
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3)


def test_mlp_runs_on_feature_vectors_with_sigmoid():
    model = models.build_model("mlp", 5, in_features=120, width=32, depth=2, activation="sigmoid").eval()
    assert model(torch.randn(4, 120)).shape == (4, 5)
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_convnet_depth_width_dropout_and_activation_are_honoured():
    model = models.build_model("convnet", 10, (64, 64), width=12, depth=5, dropout=0.3, activation="sigmoid")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 24, 48, 96, 96]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 5
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_architecture_is_plain_and_rebuilds_the_same_network():
    arch = models.architecture("googlenet", 10, (64, 64), width=8)
    json.dumps(arch)
    a, b = models.build_model(**arch), models.build_model(**arch)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert arch["depth"] == 1 and arch["width"] == 8


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("vgg", 10, (32, 32))
    with pytest.raises(ValueError, match="input_size"):
        models.build_model("smallcnn", 10)
    with pytest.raises(ValueError, match="in_features"):
        models.build_model("mlp", 10)
    with pytest.raises(ValueError, match="at least 16x16"):
        models.build_model("alexnet", 10, (8, 8))


def test_freeze_stops_gradients_in_the_first_blocks_only():
    model = models.build_model("resnet", 10, (32, 32), width=8)
    frozen = models.freeze_blocks(model, 2)
    blocks = list(model.blocks)
    assert frozen == sum(p.numel() for b in blocks[:2] for p in b.parameters())
    assert all(not p.requires_grad for b in blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for b in blocks[2:] for p in b.parameters())
    models.train_mode(model, 2)
    assert not blocks[0].training and not blocks[1].training and blocks[2].training
    with pytest.raises(ValueError, match="at most"):
        models.freeze_blocks(model, len(blocks))


def test_load_matching_skips_a_classifier_of_another_size():
    source = models.build_model("smallcnn", 10, (32, 32), width=8)
    target = models.build_model("smallcnn", 3, (32, 32), width=8)
    loaded, skipped = models.load_matching(target, source.state_dict())
    assert sorted(skipped) == ["blocks.2.2.bias", "blocks.2.2.weight"]
    assert torch.equal(target.state_dict()["blocks.0.0.weight"], source.state_dict()["blocks.0.0.weight"])
    assert len(loaded) == len(source.state_dict()) - 2


def test_parameter_count():
    model = models.build_model("mlp", 2, in_features=3, width=4, depth=1)
    # Linear 3x4 (no bias) + BN 4+4 + Linear 4x2 + 2
    assert models.count_parameters(model) == 12 + 8 + 10
