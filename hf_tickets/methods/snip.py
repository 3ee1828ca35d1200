"""SNIP (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity"), one-shot or
iterative.

The connection sensitivity of a weight is |∂L/∂c| at c = 1 for a multiplicative mask c, i.e. |θ ⊙ ∂L/∂θ|, with
L the model's own `outputs.loss` on training batches (the first `score_batches` batches of the trainer's train
dataloader). Over several batches the gradients are summed before the absolute value is taken (as in the SynFlow
repository's SNIP), so the score is |θ ⊙ Σ_b ∂L_b/∂θ|. The highest scores are kept, with the same allocation as
magnitude pruning (`scope`, `layer_rates`).

`iterations > 1` is iterative SNIP (de Jorge et al. 2021, and the SynFlow paper's ablation): round k of n prunes
to sparsity 1 - density**(k/n) (density = 1 - `sparsity`), re-scoring the masked model each round (weights
multiplied by their masks in a functional call); masks only shrink.

Scoring leaves no trace: weights are never written (the masked rounds use `torch.func.functional_call`),
gradients are computed with `torch.autograd.grad` (so `p.grad` is untouched), buffers such as BatchNorm running
statistics and every module's train/eval flag are restored, the global RNG is forked, and no optimizer or schedule
is involved. The model is scored in its current mode (dropout active when it is training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..allocation import masks_from_scores
from ..config import SparsityConfig
from ..masks import MaskSet
from ..sanity import oriented
from ._at_init import (
    check_int,
    check_unstructured,
    grads,
    model_loss,
    requiring_grad,
    schedule_rates,
    take_batches,
    untouched,
)
from .base import BatchSource, SparsityMethod, register_method


@dataclass
class SNIPConfig(SparsityConfig):
    """`SparsityConfig` of `method="snip"`.

    Args:
        sparsity: fraction of the targeted weights pruned (required).
        score_batches: training batches whose gradients are summed for the scores.
        iterations: 1 is SNIP; more is iterative SNIP with the exponential schedule (masks only shrink).
    """

    method: str = field(default="snip", metadata={"help": "snip: keep the largest |θ ⊙ ∂L/∂θ| at initialization."})
    score_batches: int = field(default=1, metadata={"help": "Training batches the SNIP scores are summed over."})
    iterations: int = field(default=1, metadata={"help": "Pruning rounds (exponential schedule); 1 = one-shot."})

    def validate_method(self) -> None:
        check_unstructured(self)
        check_int(self, "score_batches")
        check_int(self, "iterations")


def snip_scores(
    model: nn.Module,
    targets: dict[str, nn.Parameter],
    batches: list[dict],
    masks: "dict[str, torch.Tensor] | None" = None,
) -> dict[str, torch.Tensor]:
    """|θ ⊙ Σ_b ∂L_b/∂θ| per target (of the masked model when `masks` is given). Leaves the model untouched."""
    names = list(targets)
    params = [targets[n] for n in names]
    total = [torch.zeros_like(p) for p in params]
    with untouched(model), requiring_grad(params):
        for batch in batches:
            loss = model_loss(model, batch, targets, masks, "snip")
            for acc, g in zip(total, grads(loss, params)):
                acc.add_(g.detach())
    return {n: (p.detach() * g).abs().float() for n, p, g in zip(names, params, total)}


class SNIP(SparsityMethod):
    """Keep the weights with the largest connection sensitivity |θ ⊙ ∂L/∂θ|."""

    needs_data = True
    sanity_checks = ("shuffle", "reinit", "invert")

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        data = take_batches(batches, cfg.score_batches, "snip")
        masks = None
        for rate in schedule_rates(cfg.sparsity, cfg.iterations):
            scores = oriented(snip_scores(model, targets, data, masks), cfg)  # invert: every round
            masks = masks_from_scores(
                scores,
                rate,
                scope=cfg.scope,
                layer_rates=cfg.layer_rates,
                current=masks,
                max_layer_sparsity=cfg.max_layer_sparsity,
            )
        return MaskSet(masks, self.mask_metadata(score_batches=cfg.score_batches, iterations=cfg.iterations))


register_method("snip", SNIPConfig, SNIP)
