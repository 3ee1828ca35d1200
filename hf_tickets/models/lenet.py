"""LeNet-300-100 (the MLP of Frankle & Carbin 2019) and LeNet-5 (LeCun et al. 1998, with ReLU and max pooling)."""

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

__all__ = ["LeNet5Config", "LeNet5ForImageClassification", "LeNet300100Config", "LeNet300100ForImageClassification"]


class LeNet300100Config(ImageClassificationConfig):
    """LeNet-300-100: a ReLU MLP on the flattened image (266,610 parameters on MNIST).

    Args:
        hidden_sizes (`list[int]`, defaults to `[300, 100]`): widths of the hidden layers.
        weight_init (`str`, defaults to `"glorot_normal"`): Frankle & Carbin's Gaussian Glorot, `"kaiming_normal"`
            (fan_in, ReLU) or `"lecun_normal"` (variance 1/fan_in, truncated at 2 std: SNIP's reference code);
            biases start at zero either way.
        num_channels, image_size, num_labels: see `ImageClassificationConfig`; defaults are MNIST's (1, 28, 10).
    """

    model_type = "lenet_300_100"

    def __init__(
        self,
        hidden_sizes: list[int] | None = None,
        num_channels: int = 1,
        image_size: int = 28,
        num_labels: int | None = None,
        weight_init: str = "glorot_normal",
        **kwargs,
    ) -> None:
        hidden_sizes = [300, 100] if hidden_sizes is None else list(hidden_sizes)
        check_positive(type(self).__name__, **{f"hidden_sizes[{i}]": h for i, h in enumerate(hidden_sizes)})
        check_weight_init(type(self).__name__, weight_init)
        self.hidden_sizes = hidden_sizes
        self.weight_init = weight_init
        super().__init__(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **kwargs)


class LeNet300100ForImageClassification(ImageClassifierModel):
    """LeNet-300-100; the output layer is `classifier` so `layer_rates={"classifier": 0.5}` reaches it
    (Frankle & Carbin prune the output layer at half the rate of the hidden layers)."""

    config_class = LeNet300100Config
    base_model_prefix = "lenet"

    def __init__(self, config: LeNet300100Config) -> None:
        super().__init__(config)
        sizes = [config.num_channels * config.image_size**2, *config.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.classifier = nn.Linear(sizes[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weight_and_bias(module, self.config.weight_init)

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.classifier(x)


class LeNet5Config(ImageClassificationConfig):
    """LeNet-5: conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> fc 120 -> fc 84 -> classifier.

    Args:
        conv1_padding (`int`, *optional*): padding of the first conv. Defaults to 2 for 28x28 inputs, so MNIST
            reaches the fully connected layers as 16x5x5 exactly like LeNet-5's 32x32 input, and 0 otherwise.
        weight_init (`str`, defaults to `"glorot_normal"`): as in `LeNet300100Config`.
        num_channels, image_size, num_labels: see `ImageClassificationConfig`; defaults are MNIST's (1, 28, 10).
    """

    model_type = "lenet5"

    def __init__(
        self,
        conv1_padding: int | None = None,
        num_channels: int = 1,
        image_size: int = 28,
        num_labels: int | None = None,
        weight_init: str = "glorot_normal",
        **kwargs,
    ) -> None:
        check_weight_init(type(self).__name__, weight_init)
        self.weight_init = weight_init
        # Resolved here, not in the model, so the saved config states the geometry explicitly.
        if conv1_padding is None:
            conv1_padding = 2 if image_size == 28 else 0
        if not isinstance(conv1_padding, int) or conv1_padding < 0:
            raise ValueError(f"LeNet5Config.conv1_padding={conv1_padding!r} is not valid: use an int >= 0.")
        self.conv1_padding = conv1_padding
        super().__init__(num_channels=num_channels, image_size=image_size, num_labels=num_labels, **kwargs)
        if self.feature_size < 1:
            raise ValueError(
                f"LeNet5Config: image_size={image_size} with conv1_padding={conv1_padding} leaves no pixels after "
                "two 5x5 convs and two 2x2 pools: use image_size + 2 * conv1_padding >= 16."
            )

    @property
    def feature_size(self) -> int:
        """Side of the last feature map (5 for 32x32 inputs)."""
        side = (self.image_size + 2 * self.conv1_padding - 4) // 2
        return (side - 4) // 2


class LeNet5ForImageClassification(ImageClassifierModel):
    """LeNet-5 with ReLU and 2x2 max pooling, the form used in pruning papers (not the original tanh/subsampling).

    Initialized with Gaussian Glorot and zero biases like the other Frankle & Carbin networks: LeCun's original
    uniform(+-2.4/fan_in) was made for squashing units and shrinks ReLU activations layer by layer.
    """

    config_class = LeNet5Config
    base_model_prefix = "lenet"

    def __init__(self, config: LeNet5Config) -> None:
        super().__init__(config)
        self.conv1 = nn.Conv2d(config.num_channels, 6, kernel_size=5, padding=config.conv1_padding)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * config.feature_size**2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weight_and_bias(module, self.config.weight_init)

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(pixel_values)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.classifier(x)
