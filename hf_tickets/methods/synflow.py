"""SynFlow (Tanaka, Kunin, Yamins and Ganguli 2020, "Pruning neural networks without any data by iteratively
conserving synaptic flow"): data-free pruning at initialization.

Scoring runs on a deep copy of the model, so nothing of the real model changes: its weights, signs, buffers,
gradients and train/eval flags are never touched (nothing needs restoring), and the global RNG is forked. On the
copy, as in the authors' code (github.com/ganguli-lab/Synaptic-Flow, `Pruners/pruners.py`, `SynFlow.score`):
every module is put in eval mode (BatchNorm uses its running statistics, dropout is off), every floating-point
parameter and buffer is replaced by its absolute value (`linearize`), in float64 when `double` is set, and the
input is a single all-ones sample. R = the sum of the output logits (= 1ᵀ(∏|W|)1 for a linear network) and the
score of a targeted weight is |θ ⊙ ∂R/∂θ|. The scores are iterated for `iterations` rounds (default 100) with the
exponential schedule: round k of n prunes to sparsity 1 - density**(k/n), the masks are applied to the copy
before the next round, and masks only shrink. Allocation as the other methods (`scope`, `layer_rates`).

SynFlow is defined for continuous inputs: the input shape comes from `input_shape` (one sample, without the batch
dimension) or, for image models, from the model config's `num_channels` and `image_size`. Token models
(`input_ids`) cannot be fed all-ones inputs meaningfully and are refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from ..allocation import masks_from_scores
from ..config import SparsityConfig
from ..masks import MaskSet
from ..sanity import oriented
from ._at_init import check_int, check_unstructured, schedule_rates
from .base import BatchSource, SparsityMethod, register_method


@dataclass
class SynFlowConfig(SparsityConfig):
    """`SparsityConfig` of `method="synflow"`.

    Args:
        sparsity: fraction of the targeted weights pruned (required).
        iterations: pruning rounds with the exponential schedule (the paper uses 100).
        input_shape: shape of one input sample without the batch dimension, e.g. [3, 32, 32] or [784]; by default
            taken from the model config's `num_channels` and `image_size`.
        double: score in float64 (on the copy), which keeps R finite in deep networks.
    """

    method: str = field(default="synflow", metadata={"help": "synflow: data-free, iterative synaptic flow."})
    iterations: int = field(default=100, metadata={"help": "Pruning rounds (exponential schedule); the paper: 100."})
    input_shape: Optional[list[int]] = field(
        default=None, metadata={"help": "One input sample's shape, e.g. 3 32 32 (default: from the model config)."}
    )
    double: bool = field(default=True, metadata={"help": "Score in float64 on the copy of the model."})

    def validate_method(self) -> None:
        check_unstructured(self)
        check_int(self, "iterations")
        if self.input_shape is not None:
            shape = list(self.input_shape) if isinstance(self.input_shape, (list, tuple)) else None
            if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
                raise ValueError(
                    f"SynFlowConfig.input_shape={self.input_shape!r} must be a list of ints >= 1: one input sample's "
                    "shape without the batch dimension, e.g. [3, 32, 32]."
                )
            self.input_shape = shape
        if not isinstance(self.double, bool):
            raise ValueError(f"SynFlowConfig.double={self.double!r} must be True or False.")


def synflow_input_shape(model: nn.Module, input_shape: Optional[list[int]] = None) -> tuple[int, ...]:
    """One sample's shape: `input_shape`, else (num_channels, H, W) from an image model's config."""
    main = getattr(model, "main_input_name", None)
    if main == "input_ids":
        raise ValueError(
            f"method='synflow' feeds an all-ones continuous input, and {type(model).__name__} reads token ids "
            "(`input_ids`): SynFlow supports image and vector models only (their sample shape comes from the "
            "config's num_channels/image_size or from SynFlowConfig.input_shape); use method='snip' or 'grasp' here."
        )
    if input_shape is not None:
        return tuple(input_shape)
    config = getattr(model, "config", None)
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if main != "input_features" and isinstance(channels, int) and size is not None:
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (channels, *hw)
    raise ValueError(
        f"method='synflow' feeds an all-ones input and cannot derive its shape from {type(model).__name__}"
        + (f" (its input is {main!r}: SynFlow needs continuous inputs such as images or vectors)" if main else "")
        + ": set SynFlowConfig.input_shape to one sample's shape without the batch dimension, e.g. [3, 32, 32]."
    )


def _logits(outputs: object) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"method='synflow' needs the model's output logits (a tensor, or an output with `logits`), got "
            f"{type(outputs).__name__}."
        )
    return logits


def linearized_copy(model: nn.Module, double: bool = True) -> nn.Module:
    """A deep copy of `model` in eval mode with every floating-point parameter and buffer replaced by its absolute
    value (float64 when `double`); the model itself is not touched."""
    net = copy.deepcopy(model)
    net.eval()
    if double:
        net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.grad = None
            p.abs_()
        for b in net.buffers():
            if b.is_floating_point():
                b.abs_()
    return net


def _copy_scores(
    net: nn.Module, names: list[str], input_shape: tuple[int, ...], main: Optional[str], masks
) -> dict[str, torch.Tensor]:
    params = dict(net.named_parameters())
    targets = [params[n] for n in names]
    with torch.no_grad():  # masks only shrink, so applying each round's masks to the copy is cumulative and exact
        for name, mask in (masks or {}).items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
    for p in targets:
        p.requires_grad_(True)
    ones = torch.ones((1, *input_shape), dtype=targets[0].dtype, device=targets[0].device)
    outputs = net(**{main: ones}) if isinstance(main, str) else net(ones)
    found = torch.autograd.grad(_logits(outputs).sum(), targets, allow_unused=True)
    return {
        n: (p.detach() * (torch.zeros_like(p) if g is None else g)).abs() for n, p, g in zip(names, targets, found)
    }


def synflow_scores(
    model: nn.Module,
    names: list[str],
    input_shape: tuple[int, ...],
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    double: bool = True,
) -> dict[str, torch.Tensor]:
    """|θ ⊙ ∂R/∂θ| (float32) of the targets `names` on a linearised deep copy of `model`, masked by `masks`."""
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        net = linearized_copy(model, double)
        scores = _copy_scores(net, names, input_shape, getattr(model, "main_input_name", None), masks)
    return {n: s.float().to(model.get_parameter(n).device) for n, s in scores.items()}


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted(
        {p.device.index for p in model.parameters() if p.device.type == "cuda" and p.device.index is not None}
    )


class SynFlow(SparsityMethod):
    """Iterative synaptic-flow pruning without data."""

    needs_data = False
    sanity_checks = ("shuffle", "reinit", "invert")

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        shape = synflow_input_shape(model, cfg.input_shape)
        names = list(targets)
        main = getattr(model, "main_input_name", None)
        masks = None
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            net = linearized_copy(model, cfg.double)  # one copy for all rounds; the model is never touched
            for rate in schedule_rates(cfg.sparsity, cfg.iterations):
                scores = _copy_scores(net, names, shape, main, masks)
                scores = oriented({n: s.float().to(targets[n].device) for n, s in scores.items()}, cfg)
                masks = masks_from_scores(  # invert: the lowest scores kept in every round
                    scores,
                    rate,
                    scope=cfg.scope,
                    layer_rates=cfg.layer_rates,
                    current=masks,
                    max_layer_sparsity=cfg.max_layer_sparsity,
                )
            del net
        return MaskSet(masks, self.mask_metadata(iterations=cfg.iterations))


register_method("synflow", SynFlowConfig, SynFlow)
