"""`apply_sparsity`: compute a method's initial masks for a model and zero the pruned weights in place."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .allocation import check_layer_rates
from .config import SparsityConfig
from .enforce import apply_masks_
from .masks import MaskSet
from .methods import BatchSource, SparsityMethod, build_method
from .peft_interop import bind_masks
from .peft_methods import prepare_method
from .sanity import apply_sanity_check
from .targets import resolve_targets

MASKS_ATTR = "hf_tickets_masks"


def initial_masks(model: nn.Module, method: SparsityMethod, batches: BatchSource = None) -> MaskSet:
    """The masks `method` starts training `model` with. No weight is changed, except under
    `sanity_check="reinit"`, which re-initialises the model in place after its masks were chosen."""
    config = method.config
    targets = resolve_targets(model, config)
    # Checked here, not only in allocation, so that every method (N:M ones too) rejects a key matching nothing.
    check_layer_rates(list(targets), config.layer_rates)
    if not targets:
        return MaskSet({}, method.mask_metadata())
    if method.needs_data and batches is None:
        raise ValueError(
            f"method={config.method!r} scores weights on training batches: give the trainer a train_dataset (or pass "
            "batches= to apply_sparsity)."
        )
    masks = method.initial_masks(model, targets, batches)
    _refuse_empty(masks, config)
    return apply_sanity_check(model, masks, config)


def _refuse_empty(masks: MaskSet, config: SparsityConfig) -> None:
    """Before anything changes: masks that keep no weight of a layer pruned on its own (or of every layer) cut
    every path through it, so the run could only train a constant."""
    empty = [name for name, mask in masks.items() if mask.numel() and not bool(mask.any())]
    if empty and (config.scope == "layerwise" or len(empty) == len(masks)):
        raise ValueError(
            f"SparsityConfig(sparsity={config.sparsity}, scope={config.scope!r}) keeps no weight of {empty[:3]}"
            f"{' ...' if len(empty) > 3 else ''} ({len(empty)} of {len(masks)} tensors): lower sparsity, use "
            "scope='global', exclude those modules (exclude_modules) or cap them (max_layer_sparsity)."
        )


def apply_sparsity(
    model: nn.Module, config: SparsityConfig, masks: Optional[MaskSet] = None, batches: BatchSource = None
) -> MaskSet:
    """Sparsify `model` in place and return its `MaskSet`.

    With `masks`, those masks are checked against the model and applied instead of computing new ones; `batches`
    (a callable returning an iterable of model inputs) feeds methods that score weights on data. The masks are also
    attached to the model as `model.hf_tickets_masks` (a plain attribute: state_dict keys do not change), so that
    `TicketTrainer` picks them up.
    """
    if masks is None:
        masks = initial_masks(model, prepare_method(model, build_method(config)), batches)
    masks.validate_for(model)
    apply_masks_(model, masks)
    bind_masks(model, masks)  # a masked-LoRA model keeps its adapters' updates inside these masks
    object.__setattr__(model, MASKS_ATTR, masks)
    return masks
