"""Reference image models: shapes, loss, paper init, parameter counts, Auto round trips and a Trainer step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, Trainer, TrainingArguments

from hf_tickets import models
from hf_tickets.models import (
    MODEL_NAMES,
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarVGGConfig,
    ConvNetConfig,
    LeNet5Config,
    LeNet300100Config,
    build_model,
)

# The eight names the project relies on, with the input shapes (channels, side) each must handle.
INPUT_SHAPES = {
    "lenet_300_100": [(1, 28), (1, 8)],
    "lenet5": [(1, 28), (3, 32)],
    "conv2": [(3, 32), (1, 28)],
    "conv4": [(3, 32), (1, 28)],
    "conv6": [(3, 32), (1, 28)],
    "resnet20": [(3, 32), (1, 28)],
    "vgg16": [(3, 32), (1, 28)],
    "vgg19": [(3, 32), (1, 28)],
}
SHAPE_CASES = [(name, c, s) for name, shapes in INPUT_SHAPES.items() for c, s in shapes]

# Exact parameter counts. Cross-checks: LeNet-300-100 = 266,610 and Conv-2/4 = 4.3M/2.4M (Frankle & Carbin 2019,
# Figure 2); ResNet-20/110 and VGG-16/19 equal open_lth's own tests (models/test/test_cifar_*.py). Conv-6 follows
# the paper's layer list (FC input 4x4x256); Figure 2's "1.7M" for it does not match that list's arithmetic.
PARAM_COUNTS = {
    ("lenet_300_100", 1, 28): 266_610,
    ("lenet_300_100", 1, 8): 50_610,
    ("lenet5", 1, 28): 61_706,
    ("lenet5", 3, 32): 62_006,
    ("conv2", 3, 32): 4_301_642,
    ("conv4", 3, 32): 2_425_930,
    ("conv6", 3, 32): 2_262_602,
    ("resnet20", 3, 32): 272_474,
    ("resnet110", 3, 32): 1_730_714,
    ("vgg16", 3, 32): 14_728_266,
    ("vgg19", 3, 32): 20_040_522,
}


def _build(name: str, channels: int, side: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_channels=channels, image_size=side, **kwargs)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,channels,side", SHAPE_CASES)
def test_forward_shape_and_loss(name, channels, side):
    model = _build(name, channels, side, num_labels=7)
    x = torch.randn(2, channels, side, side)
    labels = torch.tensor([0, 6])
    out = model(pixel_values=x)
    assert out.logits.shape == (2, 7) and out.loss is None
    # The output layer is `classifier` in every model, so layer_rates={"classifier": ...} reaches it.
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 7
    out = model(pixel_values=x, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("key", list(PARAM_COUNTS), ids=lambda k: f"{k[0]}-{k[1]}x{k[2]}")
def test_parameter_counts(key):
    name, channels, side = key
    assert _num_params(_build(name, channels, side)) == PARAM_COUNTS[key]


def test_resnet_shortcut_options():
    # Option A (zero-padded identity) has no shortcut parameters: the 2 projections of option B are 2,752.
    assert _num_params(CifarResNetForImageClassification(CifarResNetConfig(shortcut_type="zero_pad"))) == 269_722
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=8, shortcut_type="zero_pad"))
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)


def _rel_close(actual: float, expected: float, tol: float = 0.06) -> bool:
    return abs(actual - expected) <= tol * expected


@pytest.mark.parametrize(
    "name,param,expected_std",
    [
        # Gaussian Glorot: std = sqrt(2 / (fan_in + fan_out)); Kaiming normal: std = sqrt(2 / fan_in).
        ("lenet_300_100", "hidden.0.weight", math.sqrt(2 / (784 + 300))),
        ("lenet5", "fc1.weight", math.sqrt(2 / (400 + 120))),
        ("conv4", "convs.3.weight", math.sqrt(2 / (128 * 9 + 128 * 9))),
        ("resnet20", "blocks.8.conv2.weight", math.sqrt(2 / (64 * 9))),
        ("vgg16", "layers.0.conv.weight", math.sqrt(2 / (3 * 9))),
    ],
)
def test_paper_init_survives_post_init(name, param, expected_std):
    """post_init runs `_init_weights`; it must give the paper's init, not transformers' normal(0.02) default."""
    model = _build(name, *INPUT_SHAPES[name][0])
    weight = dict(model.named_parameters())[param]
    assert _rel_close(weight.std().item(), expected_std), (weight.std().item(), expected_std)
    assert abs(weight.mean().item()) < 0.1 * expected_std
    for pname, p in model.named_parameters():
        if pname.endswith("bias") and "bn" not in pname:
            assert torch.count_nonzero(p) == 0, pname
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_batchnorm_uniform_init():
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=8, batchnorm_init="uniform"))
    gamma = model.bn.weight
    assert torch.all((gamma >= 0) & (gamma < 1)) and gamma.std() > 0


@pytest.mark.parametrize("name", list(INPUT_SHAPES))
def test_save_load_round_trip(name, tmp_path):
    channels, side = INPUT_SHAPES[name][0]
    model = _build(name, channels, side, num_labels=5)
    x = torch.randn(3, channels, side, side)
    model.train()
    model(x)  # moves BatchNorm running stats off their defaults, so the test sees whether buffers are saved
    model.eval()
    model.save_pretrained(tmp_path)

    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    drop = {"_name_or_path"}
    assert {k: v for k, v in config.to_dict().items() if k not in drop} == {
        k: v for k, v in model.config.to_dict().items() if k not in drop
    }


def test_non_default_config_round_trip(tmp_path):
    config = CifarResNetConfig(depth=8, width=4, shortcut_type="zero_pad", batchnorm_init="uniform", num_labels=3)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CifarResNetConfig)
    for field in ("depth", "width", "shortcut_type", "batchnorm_init", "num_labels", "num_channels", "image_size"):
        assert getattr(loaded, field) == getattr(config, field), field
    lenet5 = LeNet5Config(num_channels=3, image_size=32)
    lenet5.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).conv1_padding == 0


def test_auto_classes_build_from_config():
    for config in (LeNet300100Config(), LeNet5Config(), ConvNetConfig(), CifarResNetConfig(depth=8), CifarVGGConfig()):
        assert AutoConfig.for_model(config.model_type).__class__ is type(config)
        model = AutoModelForImageClassification.from_config(config)
        assert isinstance(model.config, type(config))


def test_registration_is_idempotent():
    models._register()
    models._register()
    assert AutoConfig.for_model("cifar_vgg").__class__ is CifarVGGConfig


def test_loss_kwargs_and_tuple_output():
    model = _build("lenet_300_100", 1, 8)
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    out = model(x, labels=labels, num_items_in_batch=4)  # Trainer passes this under gradient accumulation
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels, reduction="sum") / 4)
    loss, logits = model(x, labels=labels, return_dict=False)
    assert logits.shape == (2, 10) and loss.ndim == 0


def test_bad_input_shape_fails_clearly():
    model = _build("lenet_300_100", 1, 28)
    with pytest.raises(ValueError, match="image_size=28"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="num_channels=3"):
        _build("resnet20", 3, 32)(torch.randn(2, 1, 32, 32))


def test_deepcopy_keeps_weights():
    model = _build("conv2", 3, 32)
    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))


def test_build_model_names():
    assert set(INPUT_SHAPES) <= set(MODEL_NAMES)
    with pytest.raises(ValueError, match="lenet_300_100.*vgg19"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="num_conv_layers"):
        build_model("conv2", num_conv_layers=4)
    assert build_model("conv4", num_conv_layers=4).config.num_conv_layers == 4


@pytest.mark.parametrize(
    "config_cls,kwargs,field",
    [
        (LeNet300100Config, {"hidden_sizes": [300, 0]}, "hidden_sizes"),
        (LeNet5Config, {"image_size": 8}, "image_size"),
        (LeNet5Config, {"conv1_padding": -1}, "conv1_padding"),
        (ConvNetConfig, {"num_conv_layers": 3}, "num_conv_layers"),
        (CifarResNetConfig, {"depth": 21}, "depth"),
        (CifarResNetConfig, {"shortcut_type": "A"}, "shortcut_type"),
        (CifarVGGConfig, {"depth": 12}, "depth"),
        (CifarVGGConfig, {"batchnorm_init": "zeros"}, "batchnorm_init"),
        (CifarVGGConfig, {"image_size": 0}, "image_size"),
    ],
)
def test_config_validation(config_cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        config_cls(**kwargs)


def test_one_trainer_step(tmp_path):
    model = _build("lenet_300_100", 1, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 8, 8, generator=generator), "labels": int(i % 10)} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # exercises the num_items_in_batch loss path
        learning_rate=0.1,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5", "conv2"])
def test_weight_init_kaiming_normal_draws_fan_in_relu_std_and_zero_bias(name):
    torch.manual_seed(0)
    model = build_model(name, num_labels=10, num_channels=1, image_size=28, weight_init="kaiming_normal")
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    largest = max(weights, key=lambda w: w.numel())
    fan_in = largest[0].numel()
    assert abs(largest.std().item() - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert build_model(name, num_labels=10, num_channels=1, image_size=28).config.weight_init == "glorot_normal"


@pytest.mark.parametrize("name", ["lenet_300_100", "conv2"])
def test_weight_init_lecun_normal_draws_truncated_fan_in_std(name):
    torch.manual_seed(0)
    model = build_model(name, num_labels=10, num_channels=1, image_size=28, weight_init="lecun_normal")
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    largest = max(weights, key=lambda w: w.numel())
    sigma = (1 / largest[0].numel()) ** 0.5
    # Variance 1/fan_in after truncation, and nothing beyond 2 std of the untruncated normal it is drawn from.
    assert abs(largest.std().item() - sigma) < 0.03 * sigma
    assert largest.abs().max().item() <= 2 * sigma / 0.87962566103423978 + 1e-7
    assert largest.abs().max().item() > 1.9 * sigma
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_weight_init_unknown_name_is_refused():
    with pytest.raises(ValueError, match="weight_init='he' is not valid"):
        build_model("lenet5", weight_init="he")
