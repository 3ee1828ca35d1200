"""GraSP (Wang, Zhang and Grosse 2020, "Picking Winning Tickets Before Training by Preserving Gradient Flow").

With g = ∂L/∂θ (summed over the `score_batches` scoring batches, detached) and H the Hessian of the loss, the
score of a weight is S = −θ ⊙ Hg; Hg is the gradient of the scalar gᵀ ∂L/∂θ (with ∂L/∂θ built with
`create_graph=True`), a double backward, summed over the same batches. A large S means removing the weight
*increases* the gradient norm the least — or reduces it — so, as in the paper (Algorithm 1) and the authors' code
(github.com/alecwangcq/GraSP, `pruner/GraSP.py`: it takes the top-k of the normalised scores and keeps
`score <= threshold`), the weights with the LARGEST scores are pruned and the smallest kept. The reference code's
normalisation by |Σ S| does not change the order and is omitted; it also divides the logits by a temperature
T = 200 and picks a class-balanced sample — here L is the model's own `outputs.loss` on batches of the trainer's
train dataloader, unchanged. Pruning follows the same allocation as the other methods (`scope`, `layer_rates`).

Scoring leaves no trace: weights and `p.grad` are never written (`torch.autograd.grad`), buffers and train/eval
flags are restored, the global RNG is forked, no optimizer or schedule is involved. The Hessian is over the
targeted weights only (the reference code's Conv/Linear weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..allocation import masks_from_scores
from ..config import SparsityConfig
from ..masks import MaskSet
from ..sanity import oriented
from ._at_init import check_int, check_unstructured, grads, model_loss, requiring_grad, take_batches, untouched
from .base import BatchSource, SparsityMethod, register_method


@dataclass
class GraSPConfig(SparsityConfig):
    """`SparsityConfig` of `method="grasp"`.

    Args:
        sparsity: fraction of the targeted weights pruned (required).
        score_batches: training batches the gradient g and the Hessian-gradient product Hg are summed over.
    """

    method: str = field(default="grasp", metadata={"help": "grasp: prune the largest -θ ⊙ Hg (gradient flow)."})
    score_batches: int = field(default=1, metadata={"help": "Training batches g and Hg are summed over."})

    def validate_method(self) -> None:
        check_unstructured(self)
        check_int(self, "score_batches")


def grasp_scores(model: nn.Module, targets: dict[str, nn.Parameter], batches: list[dict]) -> dict[str, torch.Tensor]:
    """S = −θ ⊙ Hg per target (higher = pruned first). Leaves the model untouched."""
    names = list(targets)
    params = [targets[n] for n in names]
    with untouched(model), requiring_grad(params):
        g = [torch.zeros_like(p) for p in params]
        for batch in batches:
            for acc, gb in zip(g, grads(model_loss(model, batch, targets, None, "grasp"), params)):
                acc.add_(gb.detach())
        hg = [torch.zeros_like(p) for p in params]
        for batch in batches:
            loss = model_loss(model, batch, targets, None, "grasp")
            first = grads(loss, params, create_graph=True)
            z = sum((gc * gf).sum() for gc, gf in zip(g, first))
            if not (isinstance(z, torch.Tensor) and z.requires_grad):
                continue  # the loss is linear in the targets: Hg = 0
            for acc, h in zip(hg, grads(z, params)):
                acc.add_(h.detach())
    return {n: (-p.detach() * h).float() for n, p, h in zip(names, params, hg)}


class GraSP(SparsityMethod):
    """Prune the weights whose removal least reduces gradient flow: the largest −θ ⊙ Hg."""

    needs_data = True
    sanity_checks = ("shuffle", "reinit", "invert")

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        scores = grasp_scores(model, targets, take_batches(batches, cfg.score_batches, "grasp"))
        keep = {n: -s for n, s in scores.items()}  # masks_from_scores keeps the highest: keep the smallest S
        masks = masks_from_scores(
            oriented(keep, cfg),  # invert: keep the largest S, the weights GraSP would prune first
            cfg.sparsity,
            scope=cfg.scope,
            layer_rates=cfg.layer_rates,
            max_layer_sparsity=cfg.max_layer_sparsity,
        )
        return MaskSet(masks, self.mask_metadata(score_batches=cfg.score_batches))


register_method("grasp", GraSPConfig, GraSP)
