"""CIFAR ResNet (He et al. 2016, section 4.2): depth 6n+2, three stages of 16/32/64 channels, basic blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import (
    ImageClassificationConfig,
    ImageClassifierModel,
    check_batchnorm_init,
    check_positive,
    kaiming_init,
)

__all__ = ["CifarResNetConfig", "CifarResNetForImageClassification"]

SHORTCUT_TYPES = ("projection", "zero_pad")


class CifarResNetConfig(ImageClassificationConfig):
    """ResNet-20/32/44/56/110 for 32x32 images.

    Args:
        depth (`int`, defaults to 20): 6n + 2 layers, n basic blocks per stage (20, 32, 44, 56, 110, ...).
        width (`int`, defaults to 16): channels of the first stage; the others have 2x and 4x.
        shortcut_type (`str`, defaults to `"projection"`): how a block that changes shape is bypassed.
            `"projection"` is He et al.'s option B, a 1x1 conv + BatchNorm (open_lth's choice; 272,474 parameters for
            ResNet-20). `"zero_pad"` is option A, the paper's CIFAR choice: stride-2 identity with zero channels
            appended, parameter-free (269,722 parameters).
        batchnorm_init (`str`, defaults to `"ones"`): `"ones"` (gamma=1) or open_lth's `"uniform"` (gamma ~ U[0,1)).
        num_channels, image_size, num_labels: see `ImageClassificationConfig`; defaults are CIFAR-10's (3, 32, 10).
    """

    model_type = "cifar_resnet"

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        shortcut_type: str = "projection",
        batchnorm_init: str = "ones",
        num_channels: int = 3,
        image_size: int = 32,
        num_labels: int | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNetConfig.depth={depth!r} is not valid: use 6n + 2 with n >= 1 (20, 32, 56).")
        check_positive("CifarResNetConfig", width=width)
        if shortcut_type not in SHORTCUT_TYPES:
            raise ValueError(
                f"CifarResNetConfig.shortcut_type={shortcut_type!r} is not valid: use one of {SHORTCUT_TYPES}."
            )
        check_batchnorm_init("CifarResNetConfig", batchnorm_init)
        self.depth = depth
        self.width = width
        self.shortcut_type = shortcut_type
        self.batchnorm_init = batchnorm_init
        super().__init__(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **kwargs)


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by `stride` and append zero channels; no parameters, so nothing here to prune."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers around a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut_type: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut_type == "projection":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetForImageClassification(ImageClassifierModel):
    """CIFAR ResNet: 3x3 stem conv, 3 stages of (depth - 2) / 6 basic blocks, global average pool, `classifier`.

    Conv and Linear weights get Kaiming normal (fan_in, ReLU gain) as in He et al. and open_lth; biases are zero.
    """

    config_class = CifarResNetConfig
    base_model_prefix = "resnet"
    fixed_input_size = False  # global average pooling accepts any spatial size

    def __init__(self, config: CifarResNetConfig) -> None:
        super().__init__(config)
        blocks_per_stage = (config.depth - 2) // 6
        widths = [config.width, 2 * config.width, 4 * config.width]
        self.conv = nn.Conv2d(config.num_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks = []
        in_channels = widths[0]
        for stage, out_channels in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, config.shortcut_type))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        kaiming_init(module, self.config.batchnorm_init)

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(pixel_values)))
        x = self.blocks(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
