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
import torch.distributed as dist
from torch import nn

from ..allocation import (
    DISTRIBUTIONS,
    counts_from_densities,
    keep_top_flat,
    layer_densities,
    order_keys,
    random_masks_with_counts,
)
from ..config import SparsityConfig
from ..distributed import collective_device, model_is_sharded
from ..masks import MaskSet
from ..sharded import gather_masks, keep_top_per_tensor, owned_local, owned_part, reshard_
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

    updates_from_shards = True  # under FSDP2 each update is ranked from the shards (`_update_sharded`)

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
        # under FSDP2 each rank keeps the (averaged) gradient rows of its own shards
        grad = owned_local if model_is_sharded(model) else (lambda g: g)
        self._grad_scores = {
            n: grad(params[n].grad).detach().abs().float() for n in masks if params[n].grad is not None
        }

    def after_optimizer_step(self, model: nn.Module, masks: MaskSet, step: int) -> Optional[MaskSet]:
        if not self.is_update_step(step):
            return None
        alpha = self.drop_fraction_at(step)
        counts = {name: int(mask.sum()) for name, mask in masks.items()}
        moving = [n for n, m in masks.items() if int(alpha * counts[n]) > 0 and counts[n] < m.numel()]
        k = {n: int(alpha * counts[n]) for n in moving}
        if model_is_sharded(model):
            new = self._update_sharded(model, masks, moving, k, counts)
        else:
            new = dict(masks.items())
            params = dict(model.named_parameters())
            for name in moving:
                flat = masks[name].reshape(-1)
                weight = params[name].detach()
                # drop: keep the n_active - k largest |w| of the active weights (ties: the first in flat order)
                magnitude = weight.abs().float().reshape(-1).masked_fill(~flat.to(weight.device), -math.inf)
                after_drop = keep_top_flat(magnitude, counts[name] - k[name])
                grow = self.grow_scores(name, weight).reshape(-1).masked_fill(after_drop, -math.inf)
                new[name] = (after_drop | keep_top_flat(grow, k[name])).view_as(masks[name]).to(flat.device)
        changed, active = 0, sum(counts.values())
        for name in moving:
            changed += int((new[name] & ~masks[name].to(new[name].device)).sum())
            self._ever_active[name] = self._ever_active[name].to(new[name].device) | new[name]
        self._grad_scores = {}
        ever = sum(int(m.sum()) for m in self._ever_active.values())
        total = sum(m.numel() for m in masks.values())
        self._pending = {
            "dst/churn": round(changed / max(active, 1), 6),
            "dst/ever_active": round(ever / max(total, 1), 6),
            "dst/drop_fraction": round(alpha, 6),
        }
        return MaskSet(new, masks.metadata)

    def _update_sharded(self, model: nn.Module, masks: MaskSet, moving: list[str], k: dict, counts: dict) -> dict:
        """The update from FSDP2 shards, bitwise the single-device one: each rank ranks its own rows, the exact
        per-tensor counts and ties come from collectives over integer counts (`sharded.keep_top_per_tensor`), and
        every rank draws the full noise from the shared generator and takes its rows."""
        reshard_(model)
        params = dict(model.named_parameters())
        magnitude = {}
        for n in moving:
            alive = owned_part(masks[n], params[n]).cpu()
            weight = owned_local(params[n]).detach().abs().float().reshape(-1).cpu()
            magnitude[n] = order_keys(weight.masked_fill(~alive, -math.inf))
        after_drop = keep_top_per_tensor(magnitude, {n: counts[n] - k[n] for n in moving}, params)
        scale = self._global_grad_max(moving)
        grow = {}
        for n in moving:  # the generator draws as in the single-device loop: one full tensor per moving layer
            score = self.grow_scores(n, params[n], scale.get(n), full_shape=tuple(params[n].shape))
            grow[n] = order_keys(score.reshape(-1).cpu().masked_fill(after_drop[n], -math.inf))
        grown = keep_top_per_tensor(grow, k, params)
        full = gather_masks({n: after_drop[n] | grown[n] for n in moving}, params)
        new = dict(masks.items())
        new.update({n: full[n].to(masks[n].device) for n in moving})
        return new

    def _global_grad_max(self, names: list[str]) -> dict[str, torch.Tensor]:
        """max |dense gradient| of each whole tensor (RigL's noise scale), from the shards: one all_reduce."""
        if not names or not self._grad_scores:
            return {}
        maxima = torch.stack(
            [
                self._grad_scores[n].max()
                if self._grad_scores.get(n) is not None and self._grad_scores[n].numel()
                else torch.zeros((), dtype=torch.float32)
                for n in names
            ]
        ).float()
        if dist.is_initialized():
            maxima = maxima.to(collective_device(maxima.device))
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        return {n: maxima[i].cpu() for i, n in enumerate(names)}

    def grow_scores(
        self, name: str, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, full_shape: Optional[tuple] = None
    ) -> torch.Tensor:
        """RigL: |dense gradient| of the update step, ties broken by seeded noise far below any real gap. Under FSDP2
        (`full_shape` given) the noise is drawn for the whole tensor and cut to this rank's rows, and `scale` is the
        whole tensor's max |gradient|."""
        if name not in self._grad_scores:
            raise RuntimeError(
                f"RigL found no dense gradient for {name!r} at an update step: the parameter did not receive a "
                "gradient, or the trainer does not call the on_dense_grads hook (use TicketTrainer)."
            )
        score = self._grad_scores[name]
        noise = self._uniform(weight, full_shape).to(score.device)
        if full_shape is None:
            return score + noise * (score.abs().max().clamp_min(1e-30) * 1e-7)
        return score.reshape(-1) + noise * (scale.to(score.device).clamp_min(1e-30) * 1e-7)

    def _uniform(self, weight: torch.Tensor, full_shape: Optional[tuple] = None) -> torch.Tensor:
        """U[0, 1) noise from the seeded generator, shaped like `weight`; under FSDP2 (`full_shape` given) drawn for
        the whole tensor, as one device draws it, and cut to this rank's rows, so the generator stays in step."""
        if full_shape is None:
            return torch.rand(weight.shape, generator=self.generator).to(weight.device)
        return owned_part(torch.rand(full_shape, generator=self.generator), weight)

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

    def grow_scores(
        self, name: str, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, full_shape: Optional[tuple] = None
    ) -> torch.Tensor:
        return self._uniform(weight, full_shape)


register_method("static", StaticConfig, StaticSparse)
register_method("rigl", RigLConfig, RigL)
register_method("set", SETConfig, SET)
