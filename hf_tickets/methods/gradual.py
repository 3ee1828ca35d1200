"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): sparsity rises on a cubic schedule
from `initial_sparsity` to `sparsity` between `start_step` and `end_step`, pruning the smallest-magnitude weights
still alive every `update_interval` optimizer steps; the masks only shrink. Everything is derived from the step
number, so the method keeps no state and a resumed run prunes exactly as an uninterrupted one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import MaskSet
from ..sharded import model_magnitude_masks
from .base import BatchSource, SparsityMethod, register_method

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GradualConfig(SparsityConfig):
    """`SparsityConfig` of `method="gradual"`; `SparsityConfig(method="gradual", ...)` builds it.

    Args:
        sparsity: the final sparsity s_f, reached at `end_step` (required).
        initial_sparsity: s_i, the sparsity training starts with (magnitude-pruned before the first step).
        start_step: t0, the optimizer step the schedule starts from.
        end_step: the optimizer step at which `sparsity` is reached (required, > `start_step`).
        update_interval: ΔT, optimizer steps between pruning updates. Masks are updated at t0 + k·ΔT up to
            `end_step`, and at `end_step` itself, to s_t = s_f + (s_i − s_f)(1 − (t − t0)/(end_step − t0))³.
    """

    method: str = field(default="gradual", metadata={"help": "gradual: gradual magnitude pruning (Zhu & Gupta)."})
    initial_sparsity: float = field(
        default=0.0, metadata={"help": "gradual: sparsity at start_step, in [0, sparsity] (magnitude-pruned)."}
    )
    start_step: int = field(default=0, metadata={"help": "gradual: optimizer step where the cubic schedule starts."})
    end_step: Optional[int] = field(
        default=None, metadata={"help": "gradual: optimizer step where the target sparsity is reached (required)."}
    )
    update_interval: int = field(
        default=100, metadata={"help": "gradual: optimizer steps between pruning updates (ΔT)."}
    )

    def validate_method(self) -> None:
        if self.pattern != "unstructured":
            raise ValueError(
                f"SparsityConfig.pattern={self.pattern!r} is not supported with method='gradual': use unstructured."
            )
        s_i = self.initial_sparsity
        if isinstance(s_i, bool) or not isinstance(s_i, (int, float)) or not (0.0 <= float(s_i) <= self.sparsity):
            raise ValueError(
                f"SparsityConfig.initial_sparsity={s_i!r} is outside [0, sparsity={self.sparsity}]: give the sparsity "
                "training starts with, at most the final target (0.0 starts dense)."
            )
        self.initial_sparsity = float(s_i)
        if not _is_int(self.start_step) or self.start_step < 0:
            raise ValueError(
                f"SparsityConfig.start_step={self.start_step!r} must be an integer number of optimizer steps >= 0."
            )
        if self.end_step is None:
            raise ValueError(
                "method='gradual' needs SparsityConfig.end_step: the optimizer step at which the target sparsity is "
                "reached, e.g. 3/4 of max_steps."
            )
        if not _is_int(self.end_step) or self.end_step <= self.start_step:
            raise ValueError(
                f"SparsityConfig.end_step={self.end_step!r} must be an integer step after "
                f"start_step={self.start_step}."
            )
        if not _is_int(self.update_interval) or self.update_interval <= 0:
            raise ValueError(
                f"SparsityConfig.update_interval={self.update_interval!r} must be an integer number of optimizer "
                "steps >= 1, e.g. 100."
            )

    def sparsity_at(self, step: int) -> float:
        """The cubic schedule: s_i up to `start_step`, s_f from `end_step` on."""
        t0, t1 = self.start_step, self.end_step
        if step <= t0:
            return self.initial_sparsity
        if step >= t1:
            return self.sparsity
        return self.sparsity + (self.initial_sparsity - self.sparsity) * (1.0 - (step - t0) / (t1 - t0)) ** 3

    def is_update_step(self, step: int) -> bool:
        """Steps t0 + k·ΔT (k >= 1) up to `end_step`, and `end_step` itself so that the target is always reached."""
        return step == self.end_step or (
            self.start_step < step < self.end_step and (step - self.start_step) % self.update_interval == 0
        )


class GradualMagnitudePruning(SparsityMethod):
    """Prune by magnitude among the weights still alive, on the cubic schedule of `GradualConfig`."""

    updates_from_shards = True  # its updates are magnitude thresholds, computed from FSDP2 shards exactly

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        if cfg.initial_sparsity > 0:
            masks = self._prune(model, list(targets), cfg.initial_sparsity, current=None)
        else:
            masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in targets.items()}
        return MaskSet(masks, self._metadata(step=0, target=cfg.initial_sparsity))

    def on_train_begin(self, model: nn.Module, masks: MaskSet, max_steps: int) -> None:
        cfg = self.config
        if max_steps is not None and 0 < max_steps < cfg.end_step:
            logger.warning(
                "SparsityConfig.end_step=%d is after the last training step (%d): the run ends at sparsity %.4f, "
                "not the target %.4f. Set end_step <= max_steps.",
                cfg.end_step,
                max_steps,
                cfg.sparsity_at(max_steps),
                cfg.sparsity,
            )

    def after_optimizer_step(self, model: nn.Module, masks: MaskSet, step: int) -> Optional[MaskSet]:
        cfg = self.config
        if not cfg.is_update_step(step):
            return None
        target = cfg.sparsity_at(step)
        new = self._prune(model, list(masks), target, current=masks)  # under FSDP2 from each rank's rows
        if all(torch.equal(new[n], masks[n].to(new[n].device)) for n in masks):
            return None
        return MaskSet(new, self._metadata(step=step, target=target))

    def _prune(self, model: nn.Module, names: list[str], sparsity: float, current) -> dict[str, torch.Tensor]:
        """Masks at `sparsity` (per pool, as magnitude pruning) keeping only weights alive in `current`."""
        cfg = self.config
        return model_magnitude_masks(
            model,
            names,
            sparsity,
            scope=cfg.scope,
            layer_rates=cfg.layer_rates,
            current=current,
            max_layer_sparsity=cfg.max_layer_sparsity,
        )

    def _metadata(self, step: int, target: float) -> dict:
        cfg = self.config
        return self.mask_metadata(
            step=step,
            target_sparsity=round(target, 8),
            initial_sparsity=cfg.initial_sparsity,
            start_step=cfg.start_step,
            end_step=cfg.end_step,
            update_interval=cfg.update_interval,
        )


register_method("gradual", GradualConfig, GradualMagnitudePruning)
