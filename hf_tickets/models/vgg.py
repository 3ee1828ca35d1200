"""CIFAR VGG-11/13/16/19 as in open_lth and Frankle et al. 2020: VGG's conv stacks with BatchNorm, one Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import ImageClassificationConfig, ImageClassifierModel, check_batchnorm_init, kaiming_init

__all__ = ["CifarVGGConfig", "CifarVGGForImageClassification"]

# Simonyan & Zisserman's configurations A, B, D, E; "M" is a 2x2 max pool. The fifth pool is dropped: on 32x32
# inputs the last stack already sees 2x2 maps, which the global average pool reduces (open_lth's layout).
VGG_PLANS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGGConfig(ImageClassificationConfig):
    """VGG for CIFAR.

    Args:
        depth (`int`, defaults to 16): 11, 13, 16 or 19.
        batchnorm_init (`str`, defaults to `"ones"`): `"ones"` (gamma=1) or open_lth's `"uniform"` (gamma ~ U[0,1)).
        num_channels, image_size, num_labels: see `ImageClassificationConfig`; defaults are CIFAR-10's (3, 32, 10).
    """

    model_type = "cifar_vgg"

    def __init__(
        self,
        depth: int = 16,
        batchnorm_init: str = "ones",
        num_channels: int = 3,
        image_size: int = 32,
        num_labels: int | None = None,
        **kwargs,
    ) -> None:
        if depth not in VGG_PLANS:
            raise ValueError(f"CifarVGGConfig.depth={depth!r} is not valid: use one of {sorted(VGG_PLANS)}.")
        check_batchnorm_init("CifarVGGConfig", batchnorm_init)
        self.depth = depth
        self.batchnorm_init = batchnorm_init
        super().__init__(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **kwargs)
        if self.image_size < 16:
            raise ValueError(f"CifarVGGConfig.image_size={image_size} is too small for 4 2x2 max pools: use >= 16.")


class ConvBNReLU(nn.Module):
    """A 3x3 conv (with bias, as in open_lth) followed by BatchNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class CifarVGGForImageClassification(ImageClassifierModel):
    """CIFAR VGG: conv stacks, global average pool, one Linear `classifier` (512 -> num_labels).

    Conv and Linear weights get Kaiming normal (fan_in, ReLU gain) as in open_lth; biases are zero.
    """

    config_class = CifarVGGConfig
    base_model_prefix = "vgg"
    fixed_input_size = False  # global average pooling accepts any spatial size >= 16

    def __init__(self, config: CifarVGGConfig) -> None:
        super().__init__(config)
        layers: list[nn.Module] = []
        channels = config.num_channels
        for spec in VGG_PLANS[config.depth]:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(ConvBNReLU(channels, int(spec)))
                channels = int(spec)
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        kaiming_init(module, self.config.batchnorm_init)

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.layers(pixel_values)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
