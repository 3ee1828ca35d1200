"""Sparse training from a random sparse start: RigL (Evci et al. 2020), SET (Mocanu et al. 2018), and the
static random mask they are compared with.

Both start from a random mask with per-layer densities from a distribution (uniform, Erdős–Rényi, ERK) and, every
`update_interval` optimizer steps until `stop_fraction` of training, drop in each layer the `drop_fraction`
(cosine-annealed) of active weights with the smallest magnitude and grow as many inactive ones: RigL by the largest
*dense* gradient magnitude of that step (seen through the `on_dense_grads` hook, accumulated over micro-steps, no
second backward), SET at random. Per-layer active counts never change. Grown weights start at zero with zero
optimizer state: pruned entries are kept at exactly zero, gradients and optimizer state included, by the
enforcement path, so nothing needs resetting. Every random choice comes from a generator seeded by `config.seed`
(identical on every rank; gradients are already averaged under DDP), and its state is checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..allocation import DISTRIBUTIONS, counts_from_densities, layer_densities, random_masks_with_counts
from ..config import SparsityConfig
from ..masks import MaskSet
from .base import BatchSource, SparsityMethod, register_method


@dataclass
class StaticConfig(SparsityConfig):
    """`SparsityConfig` of `method="static"`: a random sparse mask with per-layer densities from a distribution,
    fixed for the whole run (the baseline RigL and SET are compared with).

    Args:
        sparsity: overall fraction of targeted weights that are zero.
        distribution: per-layer densities: `"uniform"`, `"erdos_renyi"` or `"erk"` (Erdős–Rényi-kernel).
        dense_layers: parameter names kept dense (e.g. the first layer), the rest rescaled to meet `sparsity`.
    """

    method: str = field(default="static", metadata={"help": "static: a fixed random mask (distribution)."})
    distribution: str = field(default="erk", metadata={"help": "Per-layer densities: uniform, erdos_renyi or erk."})
    dense_layers: Optional[list[str]] = field(default=None, metadata={"help": "Parameter names kept dense."})

    def validate_method(self) -> None:
        name = type(self).__name__
        if self.pattern != "unstructured":
            raise ValueError(f"{name}.pattern={self.pattern!r}: method={self.method!r} is unstructured only.")
        if self.layer_rates is not None:
            raise ValueError(
                f"{name}.layer_rates is not used by method={self.method!r}: per-layer densities come from "
                "`distribution` (and `dense_layers`)."
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"{name}.distribution={self.distribution!r} is unknown: choose one of {list(DISTRIBUTIONS)}."
            )
        if isinstance(self.dense_layers, str):
            self.dense_layers = [self.dense_layers]


@dataclass
class RigLConfig(StaticConfig):
    """`SparsityConfig` of `method="rigl"` (the papers' names): `StaticConfig`'s fields, and

    Args:
        update_interval: ΔT, optimizer steps between mask updates.
        drop_fraction: α, fraction of each layer's active weights replaced at an update (cosine-annealed to 0).
        stop_fraction: T_end as a fraction of training's optimizer steps; no updates after it.
    """

    method: str = field(default="rigl", metadata={"help": "rigl: drop by magnitude, grow by dense gradient."})
    update_interval: int = field(default=100, metadata={"help": "Optimizer steps between mask updates (ΔT)."})
    drop_fraction: float = field(default=0.3, metadata={"help": "Fraction of active weights replaced per update."})
    stop_fraction: float = field(default=0.75, metadata={"help": "Fraction of training after which masks freeze."})

    def validate_method(self) -> None:
        super().validate_method()
        name = type(self).__name__
        if (
            isinstance(self.update_interval, bool)
            or not isinstance(self.update_interval, int)
            or self.update_interval < 1
        ):
            raise ValueError(f"{name}.update_interval={self.update_interval!r} must be an int >= 1 (optimizer steps).")
        if not isinstance(self.drop_fraction, (int, float)) or not 0 < self.drop_fraction < 1:
            raise ValueError(f"{name}.drop_fraction={self.drop_fraction!r} must be in (0, 1), e.g. 0.3.")
        if not isinstance(self.stop_fraction, (int, float)) or not 0 < self.stop_fraction <= 1:
            raise ValueError(f"{name}.stop_fraction={self.stop_fraction!r} must be in (0, 1], e.g. 0.75.")


@dataclass
class SETConfig(RigLConfig):
    """`SparsityConfig` of `method="set"`: RigL's fields; growth is random."""

    method: str = field(default="set", metadata={"help": "set: drop by magnitude, grow at random."})


class StaticSparse(SparsityMethod):
    """A random mask with the distribution's per-layer densities, drawn from `config.seed`, kept all run."""

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        shapes = {n: tuple(p.shape) for n, p in targets.items()}
        unknown = sorted(set(cfg.dense_layers or ()) - set(shapes))
        if unknown:
            raise ValueError(
                f"{type(cfg).__name__}.dense_layers names {unknown}, which are not targeted parameters: use names "
                f"such as {list(shapes)[:3]}."
            )
        densities = layer_densities(
            shapes,
            1.0 - cfg.sparsity,
            cfg.distribution,
            dense_layers=cfg.dense_layers or (),
            max_layer_sparsity=cfg.max_layer_sparsity,
        )
        counts = counts_from_densities(shapes, densities)
        generator = torch.Generator().manual_seed(cfg.seed)  # the initial mask: same seed, same mask, any device
        masks = random_masks_with_counts(shapes, counts, generator)
        masks = {n: m.to(targets[n].device) for n, m in masks.items()}
        return MaskSet(masks, self.mask_metadata(distribution=cfg.distribution))


class RigL(StaticSparse):
    """Drop the smallest-magnitude active weights, grow the inactive ones with the largest dense gradient."""

    def __init__(self, config: RigLConfig) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stop_step: Optional[int] = None
        self._grad_scores: dict[str, torch.Tensor] = {}
        self._ever_active: dict[str, torch.Tensor] = {}
        self._pending: dict[str, float] = {}

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        masks = super().initial_masks(model, targets, batches)
        self._ever_active = {n: m.clone() for n, m in masks.items()}
        return masks

    def on_train_begin(self, model: nn.Module, masks: MaskSet, max_steps: int) -> None:
        self.stop_step = max(1, int(self.config.stop_fraction * max_steps))
        if not self._ever_active:  # masks given from outside (load_masks): history starts with them
            self._ever_active = {n: m.clone() for n, m in masks.items()}

    def is_update_step(self, step: int) -> bool:
        return self.stop_step is not None and step % self.config.update_interval == 0 and step < self.stop_step

    def drop_fraction_at(self, step: int) -> float:
        """α_t = α/2 (1 + cos(π t / T_end)): the cosine decay of the papers."""
        return self.config.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.stop_step))

    def on_dense_grads(self, model: nn.Module, masks: MaskSet, step: int) -> None:
        if not self.is_update_step(step):
            return
        params = dict(model.named_parameters())
        self._grad_scores = {n: params[n].grad.detach().abs().float() for n in masks if params[n].grad is not None}

    def after_optimizer_step(self, model: nn.Module, masks: MaskSet, step: int) -> Optional[MaskSet]:
        if not self.is_update_step(step):
            return None
        alpha = self.drop_fraction_at(step)
        params = dict(model.named_parameters())
        new, changed, active = {}, 0, 0
        for name, mask in masks.items():
            weight = params[name].detach()
            n_active = int(mask.sum())
            k = int(alpha * n_active)
            new[name] = mask
            active += n_active
            if k == 0 or n_active == mask.numel():
                continue
            flat = mask.reshape(-1)
            drop_scores = weight.abs().float().reshape(-1).masked_fill(~flat, float("inf"))
            dropped = torch.topk(drop_scores, k, largest=False).indices
            after_drop = flat.clone()
            after_drop[dropped] = False
            grow_scores = self.grow_scores(name, weight).reshape(-1).masked_fill(after_drop, float("-inf"))
            grown = torch.topk(grow_scores, k, largest=True).indices
            after_grow = after_drop.clone()
            after_grow[grown] = True
            new[name] = after_grow.view_as(mask)
            changed += int((after_grow & ~flat).sum())
            self._ever_active[name] = self._ever_active[name].to(mask.device) | new[name]
        self._grad_scores = {}
        ever = sum(int(m.sum()) for m in self._ever_active.values())
        total = sum(m.numel() for m in masks.values())
        self._pending = {
            "dst/churn": round(changed / max(active, 1), 6),
            "dst/ever_active": round(ever / max(total, 1), 6),
            "dst/drop_fraction": round(alpha, 6),
        }
        return MaskSet(new, masks.metadata)

    def grow_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """RigL: |dense gradient| of the update step, ties broken by seeded noise far below any real gap."""
        if name not in self._grad_scores:
            raise RuntimeError(
                f"RigL found no dense gradient for {name!r} at an update step: the parameter did not receive a "
                "gradient, or the trainer does not call the on_dense_grads hook (use TicketTrainer)."
            )
        score = self._grad_scores[name]
        noise = torch.rand(score.shape, generator=self.generator).to(score.device)
        return score + noise * (score.abs().max().clamp_min(1e-30) * 1e-7)

    def log_metrics(self) -> dict[str, float]:
        pending, self._pending = self._pending, {}
        return pending

    # ---- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"pending_metrics": dict(self._pending)}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state.get("pending_metrics", {}))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"ever_active/{n}": m for n, m in self._ever_active.items()}
        tensors["generator"] = self.generator.get_state()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(tensors["generator"])
        self._ever_active = {
            k[len("ever_active/") :]: v.bool() for k, v in tensors.items() if k.startswith("ever_active/")
        }


class SET(RigL):
    """RigL's loop with random growth (seeded, identical on every rank); needs no gradient."""

    def on_dense_grads(self, model: nn.Module, masks: MaskSet, step: int) -> None:
        return None

    def grow_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)


register_method("static", StaticConfig, StaticSparse)
register_method("rigl", RigLConfig, RigL)
register_method("set", SETConfig, SET)
