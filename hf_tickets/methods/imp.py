"""Iterative magnitude pruning (Frankle & Carbin 2019): level 0 is dense; each level prunes a fraction of the
weights still alive, by magnitude, and the masks only ever shrink. The level loop lives in `hf_tickets.lottery`."""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import masks_from_scores
from ..masks import MaskSet
from ..scoring import magnitude_scores
from .base import SparsityMethod, register_method


class IterativeMagnitudePruning(SparsityMethod):
    def compute_masks(self, model: nn.Module, targets: dict[str, nn.Parameter]) -> MaskSet:
        """Level 0 trains the dense network: every targeted weight is kept."""
        masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in targets.items()}
        return MaskSet(masks, self._metadata(level=0))

    def prune(self, model: nn.Module, current: MaskSet, level: int) -> MaskSet:
        """Masks for `level`: prune `prune_fraction` of the weights alive in `current`, by the model's magnitudes."""
        params = dict(model.named_parameters())
        targets = {name: params[name] for name in current}
        cfg = self.config
        masks = masks_from_scores(
            magnitude_scores(targets),
            cfg.prune_fraction,
            scope=cfg.scope,
            layer_rates=cfg.layer_rates,
            current=current,
            relative=True,
        )
        return MaskSet(masks, self._metadata(level=level))

    def _metadata(self, level: int) -> dict:
        cfg = self.config
        return {
            "method": "imp",
            "pattern": cfg.pattern,
            "scope": cfg.scope,
            "seed": cfg.seed,
            "level": level,
            "rewind": cfg.rewind,
            "rewind_step": cfg.rewind_step,
            "prune_fraction": cfg.prune_fraction,
        }


register_method("imp", IterativeMagnitudePruning)
