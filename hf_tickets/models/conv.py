"""Conv-2 / Conv-4 / Conv-6 (Frankle & Carbin 2019): small VGG-like CIFAR networks, one class for the family."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ._base import (
    ImageClassificationConfig,
    ImageClassifierModel,
    check_positive,
    check_weight_init,
    init_weight_and_bias,
)

__all__ = ["ConvNetConfig", "ConvNetForImageClassification"]

# Output channels of each pair of 3x3 convs; a 2x2 max pool follows every pair.
CONV_PAIR_CHANNELS = (64, 128, 256)


class ConvNetConfig(ImageClassificationConfig):
    """Conv-2/4/6: pairs of 3x3 convs (64,64 | pool | 128,128 | pool | 256,256 | pool), then FC 256 -> 256 ->
    classifier.

    Args:
        num_conv_layers (`int`, defaults to 2): 2, 4 or 6 (Conv-2, Conv-4, Conv-6).
        hidden_sizes (`list[int]`, defaults to `[256, 256]`): widths of the fully connected layers.
        weight_init (`str`, defaults to `"glorot_normal"`): Gaussian Glorot, `"kaiming_normal"` (fan_in, ReLU), or
            `"lecun_normal"` (variance 1/fan_in, truncated at 2 std).
        num_channels, image_size, num_labels: see `ImageClassificationConfig`; defaults are CIFAR-10's (3, 32, 10).

    On CIFAR-10 this gives 4,301,642 / 2,425,930 / 2,262,602 parameters. The paper's Figure 2 lists Conv-6 as 1.7M,
    which its own layer list does not add up to; the layer list is what is built here.
    """

    model_type = "conv_net"

    def __init__(
        self,
        num_conv_layers: int = 2,
        hidden_sizes: list[int] | None = None,
        num_channels: int = 3,
        image_size: int = 32,
        num_labels: int | None = None,
        weight_init: str = "glorot_normal",
        **kwargs,
    ) -> None:
        check_weight_init("ConvNetConfig", weight_init)
        self.weight_init = weight_init
        if num_conv_layers not in (2, 4, 6):
            raise ValueError(
                f"ConvNetConfig.num_conv_layers={num_conv_layers!r} is not valid: use 2, 4 or 6 (Conv-2/4/6)."
            )
        hidden_sizes = [256, 256] if hidden_sizes is None else list(hidden_sizes)
        check_positive("ConvNetConfig", **{f"hidden_sizes[{i}]": h for i, h in enumerate(hidden_sizes)})
        self.num_conv_layers = num_conv_layers
        self.hidden_sizes = hidden_sizes
        super().__init__(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **kwargs)
        if self.image_size >> (num_conv_layers // 2) < 1:
            raise ValueError(
                f"ConvNetConfig: image_size={image_size} is too small for {num_conv_layers // 2} 2x2 max pools: "
                f"use image_size >= {2 ** (num_conv_layers // 2)}."
            )


class ConvNetForImageClassification(ImageClassifierModel):
    """Conv-2/4/6 with ReLU, 'same' padding, Gaussian Glorot weights and zero biases (Frankle & Carbin 2019)."""

    config_class = ConvNetConfig
    base_model_prefix = "conv_net"

    def __init__(self, config: ConvNetConfig) -> None:
        super().__init__(config)
        num_pairs = config.num_conv_layers // 2
        channels = [config.num_channels]
        for width in CONV_PAIR_CHANNELS[:num_pairs]:
            channels += [width, width]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, kernel_size=3, padding=1) for i, o in itertools.pairwise(channels))
        side = config.image_size >> num_pairs  # floor division by 2 per pool, as MaxPool2d does
        sizes = [channels[-1] * side * side, *config.hidden_sizes]
        self.fcs = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.classifier = nn.Linear(sizes[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weight_and_bias(module, self.config.weight_init)

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for index, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if index % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = x.flatten(1)
        for layer in self.fcs:
            x = F.relu(layer(x))
        return self.classifier(x)
