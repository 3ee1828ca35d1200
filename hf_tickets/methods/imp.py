"""Iterative magnitude pruning (Frankle & Carbin 2019): level 0 is dense; each level prunes a fraction of the
weights still alive, by magnitude, and the masks only ever shrink. The level loop (train, prune, rewind) lives in
`hf_tickets.lottery`; this file is the only one that knows what IMP's fields mean."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import MaskSet
from ..sharded import model_magnitude_masks
from .base import BatchSource, SparsityMethod, register_method

REWIND_MODES = ("init", "step", "lr", "none")


@dataclass
class IMPConfig(SparsityConfig):
    """`SparsityConfig` of `method="imp"`; `SparsityConfig(method="imp", ...)` builds it.

    Args:
        sparsity: the target that implies `levels` (give one of the two).
        prune_fraction: fraction of the still-alive weights pruned after each level (0.2 in the LTH papers).
        levels: number of pruning levels after the dense level 0 (level L keeps (1 - prune_fraction)**L).
        rewind: where each level restarts from. `"init"`: surviving weights back to their values at step 0 (the
            pretrained weights for a pretrained model); `"step"`: late rewinding to `rewind_step` (weights,
            optimizer, LR scheduler, RNG and data position as they were at that step of level 0); `"lr"`: keep the
            trained weights and restart the schedule from `rewind_step` (learning-rate rewinding); `"none"`: keep
            the trained weights and fine-tune at the last learning rate of the previous level.
        rewind_step: the step k of `rewind="step"`/`"lr"`: an integer number of optimizer steps, or a fraction in
            (0, 1) of a level's training steps.
    """

    method: str = field(default="imp", metadata={"help": "imp: iterative magnitude pruning."})
    prune_fraction: float = field(
        default=0.2, metadata={"help": "IMP: fraction of the still-alive weights pruned at the end of each level."}
    )
    levels: Optional[int] = field(
        default=None, metadata={"help": "IMP: pruning levels after the dense level 0 (or give a target sparsity)."}
    )
    rewind: str = field(default="init", metadata={"help": "IMP: init, step (late rewinding), lr or none."})
    rewind_step: Optional[float] = field(
        default=None, metadata={"help": "IMP: rewind step k: optimizer steps (int) or a fraction (0, 1) of a level."}
    )

    sparsity_required = False

    def validate_method(self) -> None:
        if self.pattern != "unstructured":
            raise ValueError(
                f"SparsityConfig.pattern={self.pattern!r} is not supported with method='imp': use unstructured, then "
                "make the ticket N:M with SparsityConfig(method='nm', pattern=..., base_masks=<ticket folder>)."
            )
        if (
            isinstance(self.prune_fraction, bool)
            or not isinstance(self.prune_fraction, (int, float))
            or not (0.0 < float(self.prune_fraction) < 1.0)
        ):
            raise ValueError(
                f"SparsityConfig.prune_fraction={self.prune_fraction!r} is outside (0, 1): give the fraction of alive "
                "weights pruned per level, e.g. 0.2."
            )
        if self.levels is not None and (
            isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1
        ):
            raise ValueError(f"SparsityConfig.levels={self.levels!r} must be an integer >= 1.")
        if self.levels is None and self.sparsity is None:
            raise ValueError("method='imp' needs SparsityConfig.levels or a target sparsity: give one.")
        if self.levels is not None and self.sparsity is not None and self.levels != self.implied_levels():
            raise ValueError(
                f"SparsityConfig.levels={self.levels} and sparsity={self.sparsity} contradict each other: pruning "
                f"{self.prune_fraction:.0%} per level reaches {self.sparsity} after {self.implied_levels()} levels. "
                "Give only one of them."
            )
        if self.rewind not in REWIND_MODES:
            raise ValueError(f"SparsityConfig.rewind={self.rewind!r} is unknown: choose one of {list(REWIND_MODES)}.")
        if self.rewind == "step" and self.rewind_step is None:
            raise ValueError("SparsityConfig.rewind='step' needs rewind_step: an int step k or a fraction in (0, 1).")
        if self.rewind_step is not None:
            k = self.rewind_step
            if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0 or (k >= 1 and float(k) != int(k)):
                raise ValueError(
                    f"SparsityConfig.rewind_step={k!r} must be a whole number of steps >= 0 or a fraction in (0, 1)."
                )
            if self.rewind in ("init", "none"):
                raise ValueError(
                    f"SparsityConfig.rewind_step is only used with rewind='step' or 'lr', not rewind={self.rewind!r}: "
                    "drop it or change rewind."
                )

    def implied_levels(self) -> int:
        """Levels of `prune_fraction` needed to reach at least `sparsity`."""
        import math

        if self.sparsity is None or self.sparsity <= 0:
            return 0
        return max(1, math.ceil(math.log(1.0 - self.sparsity) / math.log(1.0 - self.prune_fraction) - 1e-9))

    def num_levels(self) -> int:
        """IMP pruning levels after the dense level 0."""
        return self.levels if self.levels is not None else self.implied_levels()

    def rewind_step_for(self, total_steps: int) -> int:
        """`rewind_step` in optimizer steps for a level of `total_steps` steps (0 for rewinding to init)."""
        if self.rewind_step is None:
            return 0
        k = float(self.rewind_step)
        return int(round(k * total_steps)) if 0 < k < 1 else int(k)

    def max_rate(self) -> float:
        """`layer_rates` factors multiply the per-level fraction."""
        return self.prune_fraction

    def check_layer_cap(self) -> None:
        """The last level's sparsity of every pool, 1 - (1 - rate)**levels, must stay within `max_layer_sparsity`:
        checked here so that a run never stops at the level that would break the cap."""
        cap, levels = self.max_layer_sparsity, self.num_levels()
        pools = {"the global pool": self.prune_fraction}
        for key, factor in (self.layer_rates or {}).items():
            pools[f"layer_rates[{key!r}]"] = self.prune_fraction * float(factor)
        for what, rate in pools.items():
            final = 1.0 - (1.0 - rate) ** levels
            if final > cap + 1e-12:
                raise ValueError(
                    f"SparsityConfig.max_layer_sparsity={cap} cannot hold: after {levels} levels of "
                    f"{rate:.4g} per level, {what} reaches sparsity {final:.6g}. Use fewer levels (or a lower "
                    "sparsity target), or raise max_layer_sparsity."
                )


class IterativeMagnitudePruning(SparsityMethod):
    iterative = True

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        """Level 0 trains the dense network: every targeted weight is kept."""
        masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in targets.items()}
        return MaskSet(masks, self._metadata(level=0))

    def next_level_masks(self, model: nn.Module, masks: MaskSet, level: int) -> MaskSet:
        """Prune `prune_fraction` of the weights alive in `masks`, by the trained model's magnitudes."""
        cfg = self.config
        new = model_magnitude_masks(  # under FSDP2 from each rank's rows: bitwise the same masks
            model,
            list(masks),
            cfg.prune_fraction,
            scope=cfg.scope,
            layer_rates=cfg.layer_rates,
            current=masks,
            relative=True,
            max_layer_sparsity=cfg.max_layer_sparsity,
        )
        return MaskSet(new, self._metadata(level=level))

    def _metadata(self, level: int) -> dict:
        cfg = self.config
        return self.mask_metadata(
            level=level, rewind=cfg.rewind, rewind_step=cfg.rewind_step, prune_fraction=cfg.prune_fraction
        )


register_method("imp", IMPConfig, IterativeMagnitudePruning)
