"""One-shot pruning: magnitude (keep the largest |w|) and seeded random masks, unstructured or N:M."""

from __future__ import annotations

from torch import nn

from ..allocation import masks_from_scores, nm_masks
from ..config import SparsityConfig
from ..masks import MaskSet
from ..nm import split_nm_targets
from ..sanity import oriented
from ..scoring import magnitude_scores, random_scores
from ..targets import input_dims
from .base import BatchSource, SparsityMethod, register_method


class _OneShot(SparsityMethod):
    """Masks chosen once from scores, before training; training only keeps them."""

    def scores(self, targets: dict[str, nn.Parameter]):
        raise NotImplementedError

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        scores = oriented(self.scores(targets), cfg)
        if cfg.nm is not None:
            # layers that cannot hold N:M stay dense (logged), or fail when the user named them
            targets, _ = split_nm_targets(model, targets, cfg.nm, explicit=cfg.target_modules is not None)
            scores = {name: scores[name] for name in targets}
            dims = input_dims(model, targets)
            masks = nm_masks(scores, *cfg.nm, input_dims=dims)
            return MaskSet(masks, self.mask_metadata(nm_dims=dims))
        else:
            masks = masks_from_scores(
                scores,
                cfg.sparsity,
                scope=cfg.scope,
                layer_rates=cfg.layer_rates,
                max_layer_sparsity=cfg.max_layer_sparsity,
            )
        return MaskSet(masks, self.mask_metadata())


class MagnitudePruning(_OneShot):
    """Prune the smallest-magnitude weights, globally or per layer."""

    sanity_checks = ("shuffle", "reinit", "invert")  # magnitude at init, as in Frankle et al. 2021

    def scores(self, targets):
        return magnitude_scores(targets)


class RandomPruning(_OneShot):
    """Prune uniformly at random with `config.seed`; "layerwise" scope gives every layer exactly `sparsity`."""

    # No sanity checks: a random mask ignores the weights and has no score order, so shuffling, re-initialising or
    # inverting it gives another draw of the same random pruning.

    def scores(self, targets):
        return random_scores(targets, self.config.seed)


register_method("magnitude", SparsityConfig, MagnitudePruning)
register_method("random", SparsityConfig, RandomPruning)
