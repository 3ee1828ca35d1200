"""Shared pieces of the reference image models: input-shape config fields, the forward contract and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

try:  # transformers>=5: these skip tensors already loaded from a checkpoint, so from_pretrained never re-inits them
    import transformers.initialization as init
except ImportError:  # transformers 4.x loads after init, so plain torch init is enough
    from torch.nn import init  # type: ignore[no-redef]

__all__ = [
    "ImageClassificationConfig",
    "ImageClassifierModel",
    "check_batchnorm_init",
    "check_positive",
    "check_weight_init",
    "init_weight_and_bias",
    "classification_loss",
    "init",
    "init_batchnorm",
]

BATCHNORM_INITS = ("ones", "uniform")
# Gaussian Glorot is Frankle & Carbin 2019's init for LeNet and Conv-2/4/6; Kaiming normal (fan_in, ReLU) is what
# later LTH studies (and the course protocol in recipes/course_*) use for the same networks. LeCun normal (variance
# 1/fan_in, truncated at 2 std) is TF's `variance_scaling_initializer()` default, which SNIP's reference code draws.
WEIGHT_INITS = ("glorot_normal", "kaiming_normal", "lecun_normal")
# Std of a standard normal truncated to [-2, 2]: dividing by it gives the truncated draw the intended variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def check_positive(config_name: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{config_name}.{name}={value!r} is not valid: use a positive int.")


class ImageClassificationConfig(PretrainedConfig):
    """Input shape and class count, which every reference model needs to size its layers.

    Args:
        num_channels (`int`): channels of `pixel_values` (1 for MNIST / sklearn digits, 3 for CIFAR).
        image_size (`int`): height = width of `pixel_values` (28 MNIST, 32 CIFAR, 8 sklearn digits).
        num_labels (`int`, defaults to 10): classes; taken from `id2label` when only that is given.
    """

    def __init__(self, num_channels: int = 3, image_size: int = 32, num_labels: int | None = None, **kwargs) -> None:
        check_positive(type(self).__name__, num_channels=num_channels, image_size=image_size)
        self.num_channels = num_channels
        self.image_size = image_size
        # A saved config carries id2label, not num_labels; passing a default num_labels too would make
        # transformers warn about a mismatch on every from_pretrained of a model with other than 10 classes.
        if num_labels is None and kwargs.get("id2label") is None:
            num_labels = 10
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


def check_batchnorm_init(config_name: str, value: str) -> None:
    if value not in BATCHNORM_INITS:
        raise ValueError(f"{config_name}.batchnorm_init={value!r} is not valid: use one of {BATCHNORM_INITS}.")


def check_weight_init(config_name: str, value: str) -> None:
    if value not in WEIGHT_INITS:
        raise ValueError(f"{config_name}.weight_init={value!r} is not valid: use one of {', '.join(WEIGHT_INITS)}.")


def init_weight_and_bias(module: nn.Module, scheme: str) -> None:
    """Draw a Linear/Conv2d weight by `scheme` (one of WEIGHT_INITS) and zero its bias; other modules are left."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if scheme == "kaiming_normal":
            init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif scheme == "lecun_normal":
            fan_in = module.weight[0].numel()  # in_features, or in_channels x kernel area
            std = (1.0 / fan_in) ** 0.5 / _TRUNCATED_NORMAL_STD
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        else:
            init.xavier_normal_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)


def init_batchnorm(module: nn.BatchNorm2d, mode: str) -> None:
    """Reset a BatchNorm: mode "ones" gives gamma=1, beta=0 as in He et al.; "uniform" draws gamma ~ U[0, 1),
    open_lth's default for its CIFAR nets, which reproducing open_lth / Frankle et al. 2020 runs needs."""
    if mode == "uniform":
        init.uniform_(module.weight, 0.0, 1.0)
    else:
        init.ones_(module.weight)
    init.zeros_(module.bias)
    init.zeros_(module.running_mean)
    init.ones_(module.running_var)
    init.zeros_(module.num_batches_tracked)


def kaiming_init(module: nn.Module, batchnorm_init: str) -> None:
    """He et al. init for the CIFAR ResNets and VGGs: Kaiming normal (fan_in) convs/linears, zero biases, BN reset."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        init_batchnorm(module, batchnorm_init)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy; with `num_items_in_batch` (passed by Trainer) the sum over it, so gradient accumulation and
    multi-process runs average over the whole effective batch instead of averaging per-micro-batch means."""
    labels = labels.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


class ImageClassifierModel(PreTrainedModel):
    """Forward contract shared by the reference models; subclasses build layers and implement `compute_logits`."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Models whose first Linear sees the flattened feature map need exactly image_size x image_size inputs;
    # the global-average-pooled ones (ResNet, VGG) only need the right channel count.
    fixed_input_size = True

    def compute_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_input_embeddings(self) -> None:
        """None: an image classifier has no token embedding. PreTrainedModel's default raises, and accelerate's
        FSDP2 preparation asks every model for it."""
        return None

    def _check_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        side = cfg.image_size if self.fixed_input_size else None
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != cfg.num_channels or (side is not None and shape[2:] != (side, side)):
            expected = f"{cfg.num_channels}, {side}, {side}" if side is not None else f"{cfg.num_channels}, H, W"
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape [batch, {expected}] "
                f"(config num_channels={cfg.num_channels}, image_size={cfg.image_size}), got {list(shape)}."
            )
        # Cast floats to the weights' dtype (a bf16-loaded model fed float32 batches). Integer pixels are left
        # alone so they fail loudly in the first layer instead of being fed in unscaled (0..255).
        dtype = next(self.parameters()).dtype
        if pixel_values.is_floating_point() and pixel_values.dtype != dtype:
            pixel_values = pixel_values.to(dtype)
        return pixel_values

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput | tuple:
        """Logits for `pixel_values` [B, C, H, W]; cross-entropy loss when `labels` [B] are given."""
        logits = self.compute_logits(self._check_input(pixel_values))
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, kwargs.get("num_items_in_batch"))
        output = ImageClassifierOutput(loss=loss, logits=logits)
        return output.to_tuple() if kwargs.get("return_dict") is False else output
