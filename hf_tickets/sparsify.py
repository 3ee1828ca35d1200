"""`apply_sparsity`: compute a method's masks for a model and zero the pruned weights in place."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .allocation import check_layer_rates
from .config import SparsityConfig
from .enforce import apply_masks_
from .masks import MaskSet
from .methods import get_method
from .targets import resolve_targets

MASKS_ATTR = "hf_tickets_masks"


def apply_sparsity(model: nn.Module, config: SparsityConfig, masks: Optional[MaskSet] = None) -> MaskSet:
    """Sparsify `model` in place and return its `MaskSet`.

    With `masks`, those masks are checked against the model and applied instead of computing new ones. The masks
    are also attached to the model as `model.hf_tickets_masks` (a plain attribute: state_dict keys do not change),
    so that `TicketTrainer` picks them up.
    """
    if masks is None:
        targets = resolve_targets(model, config)
        # Checked here, not only in allocation, so that every method (N:M ones too) rejects a key matching nothing.
        check_layer_rates(list(targets), config.layer_rates)
        masks = get_method(config.method)(config).compute_masks(model, targets)
    masks.validate_for(model)
    apply_masks_(model, masks)
    object.__setattr__(model, MASKS_ATTR, masks)
    return masks
