"""Reference image models of the lottery-ticket literature as `PreTrainedModel`s, registered with the Auto classes.

Importing this package is enough for `AutoConfig` / `AutoModelForImageClassification.from_pretrained` to load
their checkpoints, with no `trust_remote_code`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel

from .conv import ConvNetConfig, ConvNetForImageClassification
from .lenet import LeNet5Config, LeNet5ForImageClassification, LeNet300100Config, LeNet300100ForImageClassification
from .resnet import CifarResNetConfig, CifarResNetForImageClassification
from .vgg import CifarVGGConfig, CifarVGGForImageClassification

__all__ = [
    "MODEL_NAMES",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarVGGConfig",
    "CifarVGGForImageClassification",
    "ConvNetConfig",
    "ConvNetForImageClassification",
    "LeNet5Config",
    "LeNet5ForImageClassification",
    "LeNet300100Config",
    "LeNet300100ForImageClassification",
    "build_model",
]

_MODEL_CLASSES: dict[type, type[PreTrainedModel]] = {
    LeNet300100Config: LeNet300100ForImageClassification,
    LeNet5Config: LeNet5ForImageClassification,
    ConvNetConfig: ConvNetForImageClassification,
    CifarResNetConfig: CifarResNetForImageClassification,
    CifarVGGConfig: CifarVGGForImageClassification,
}

# name -> (config class, the config fields that name fixes)
_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "lenet_300_100": (LeNet300100Config, {}),
    "lenet5": (LeNet5Config, {}),
    "conv2": (ConvNetConfig, {"num_conv_layers": 2}),
    "conv4": (ConvNetConfig, {"num_conv_layers": 4}),
    "conv6": (ConvNetConfig, {"num_conv_layers": 6}),
    "resnet20": (CifarResNetConfig, {"depth": 20}),
    "resnet32": (CifarResNetConfig, {"depth": 32}),
    "resnet56": (CifarResNetConfig, {"depth": 56}),
    "resnet110": (CifarResNetConfig, {"depth": 110}),
    "vgg11": (CifarVGGConfig, {"depth": 11}),
    "vgg13": (CifarVGGConfig, {"depth": 13}),
    "vgg16": (CifarVGGConfig, {"depth": 16}),
    "vgg19": (CifarVGGConfig, {"depth": 19}),
}
MODEL_NAMES: tuple[str, ...] = tuple(_PRESETS)


def build_model(name: str, **config_kwargs: Any) -> PreTrainedModel:
    """Build a freshly initialized model by its short name, e.g. `build_model("conv4", num_labels=100)`.

    `config_kwargs` go to the model's config (num_channels, image_size, num_labels, ...); the fields the name
    fixes (Conv-4's num_conv_layers, ResNet-20's depth) cannot be overridden, so a name always means one network.
    """
    if name not in _PRESETS:
        raise ValueError(f"Unknown model name {name!r}: use one of {', '.join(MODEL_NAMES)}.")
    config_cls, fixed = _PRESETS[name]
    clashes = {k: v for k, v in config_kwargs.items() if k in fixed and v != fixed[k]}
    if clashes:
        raise ValueError(
            f"build_model({name!r}) fixes {fixed}, got {clashes}: drop them or use {config_cls.__name__} directly."
        )
    config = config_cls(**{**config_kwargs, **fixed})
    return _MODEL_CLASSES[config_cls](config)


def _register() -> None:
    """Register every config/model pair with the Auto classes; safe to call again (e.g. on module reload)."""
    for config_cls, model_cls in _MODEL_CLASSES.items():
        # Re-registering our own names overwrites silently; a clash with a built-in transformers model_type raises.
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModelForImageClassification.register(config_cls, model_cls)


_register()
