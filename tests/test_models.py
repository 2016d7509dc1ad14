"""Every model builds from its plain architecture record: the small nets at 32-96 px, any timm
backbone by name; freezing and the classifier work alike for both."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from photoprep.learn import backbones, models
from photoprep.learn.models import Architecture

SMALL_IMAGE_MODELS = ("smallcnn", "convnet")


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("name", SMALL_IMAGE_MODELS)
def test_each_small_image_model_builds_and_runs_forward_at_small_sizes(name, size):
    torch.manual_seed(0)
    model = models.build_model(Architecture.of(name, 7, (size, size), width=8))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_non_square_input_works():
    model = models.build_model(Architecture.of("convnet", 3, (48, 80), width=8)).eval()
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3)


def test_mlp_runs_on_feature_vectors_with_sigmoid():
    arch = Architecture.of("mlp", 5, in_features=120, width=32, depth=2, activation="sigmoid")
    model = models.build_model(arch).eval()
    assert model(torch.randn(4, 120)).shape == (4, 5)
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_convnet_depth_width_dropout_and_activation_are_honoured():
    arch = Architecture.of("convnet", 10, (64, 64), width=12, depth=5, dropout=0.3, activation="sigmoid")
    model = models.build_model(arch)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 24, 48, 96, 96]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 5
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize(
    "arch",
    [
        Architecture.of("convnet", 10, (64, 64), width=8),
        Architecture.of("mlp", 10, (32, 32), width=16),
        Architecture.of("timm/resnet18", 4, (64, 64), dropout=0.1, drop_path=0.05),
    ],
    ids=lambda a: a.name,
)
def test_the_architecture_record_is_plain_and_rebuilds_the_same_network(arch):
    record = json.loads(json.dumps(arch.to_dict()))
    assert Architecture.from_dict(record) == arch
    a, b = models.build_model(arch), models.build_model(Architecture.from_dict(record))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_a_timm_backbone_is_built_by_name_with_the_classes_asked():
    model = models.build_model(Architecture.of("timm/resnet18", 4, (64, 64))).eval()
    assert isinstance(models.classifier_of(model), nn.Linear)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    features = models.build_model(Architecture.of("timm/resnet18", 0, (64, 64))).eval()
    assert features(torch.randn(2, 3, 64, 64)).shape == (2, 512)  # no classifier: the pooled features


def test_an_unknown_timm_name_is_one_line_with_the_closest_names():
    from photoprep.core.errors import UserError

    with pytest.raises(UserError, match=r"timm has no architecture 'resnet81' \(did you mean timm/resnet"):
        backbones.check_architecture("timm/resnet81")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        Architecture.of("vgg", 10, (32, 32))
    with pytest.raises(ValueError, match="input_size"):
        models.build_model(Architecture.of("smallcnn", 10))
    with pytest.raises(ValueError, match="in_features"):
        models.build_model(Architecture.of("mlp", 10))
    with pytest.raises(ValueError, match="at least 16x16"):
        models.build_model(Architecture.of("convnet", 10, (8, 8)))


@pytest.mark.parametrize("name", ["convnet", "timm/resnet18"])
def test_freezing_counts_layer_groups_and_frozen_batch_norms_keep_their_statistics(name):
    model = models.build_model(
        Architecture.of(name, 10, (32, 32), **({"width": 8} if name == "convnet" else {}))
    )
    groups = models.layer_groups(model)
    frozen = models.frozen_names(model, 2)
    assert frozen == set(groups[0]) | set(groups[1])
    for param_name, t in model.named_parameters():
        t.requires_grad_(param_name not in frozen)
    models.train_mode(model)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for n, module in norms.items():
        assert module.training == (f"{n}.weight" not in frozen), n
    with pytest.raises(ValueError, match="at most"):
        models.frozen_names(model, len(groups))


def test_load_matching_skips_a_classifier_of_another_size():
    source = models.build_model(Architecture.of("smallcnn", 10, (32, 32), width=8))
    target = models.build_model(Architecture.of("smallcnn", 3, (32, 32), width=8))
    loaded, skipped = models.load_matching(target, source.state_dict())
    assert sorted(skipped) == ["blocks.2.2.bias", "blocks.2.2.weight"]
    assert torch.equal(target.state_dict()["blocks.0.0.weight"], source.state_dict()["blocks.0.0.weight"])
    assert len(loaded) == len(source.state_dict()) - 2


def test_parameter_count():
    model = models.build_model(Architecture.of("mlp", 2, in_features=3, width=4, depth=1))
    # Linear 3x4 (no bias) + BN 4+4 + Linear 4x2 + 2
    assert models.count_parameters(model) == 12 + 8 + 10


def test_timm_imports_beside_the_cpu_wheel_of_torch():
    """torchvision's compiled operators may not load beside torch's CPU wheel; timm still imports."""
    timm = backbones.timm_module()
    import torchvision

    assert timm.list_models("resnet18") == ["resnet18"]
    assert torchvision.__version__.startswith("0.")
