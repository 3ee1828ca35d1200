"""LoRA adapters on a sparse base: merging that keeps the masks, and saving / loading adapter + masks.

A plain `merge_and_unload()` adds the dense ΔW = s·BA to a sparse weight and the merged model is dense again (a 2:4
pattern is gone). `merge_adapters` merges and then re-applies the masks, and says how much of ΔW's norm the masks
removed: nothing under masked LoRA (`enable_masked_lora`), whose update already lives inside the masks, so there the
merged model computes exactly what the adapted one did.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from .config import SparsityConfig
from .enforce import apply_masks_
from .masks import MaskSet, load_masks
from .peft_interop import (
    CONTROLLER_ATTR,
    active_delta,
    base_weight_name,
    enable_masked_lora,
    is_peft_model,
    lora_layers,
    masked_lora_enabled,
    masks_for,
)
from .sparsify import MASKS_ATTR

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What merging did to the adapters' updates.

    Args:
        delta_norm: Frobenius norm of all merged updates ΔW together (the updates the forward added).
        removed_norm: norm of the part of ΔW the masks set back to zero after the merge.
        masked_lora: the adapters were masked-LoRA adapters (then `removed_norm` is 0).
        layers: base weight name (of the merged model) -> {"delta_norm", "removed_norm"}.
    """

    delta_norm: float
    removed_norm: float
    masked_lora: bool
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        """removed_norm / delta_norm: 0 means the merge kept all of ΔW."""
        return self.removed_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def current_masks(model: nn.Module) -> Optional[MaskSet]:
    """The masks a peft model is kept sparse with: its masked-LoRA controller's, else those `apply_sparsity` or
    `load_sparse_adapter` attached."""
    controller = getattr(model, CONTROLLER_ATTR, None)
    if controller is not None and controller.masks is not None:
        return controller.masks
    return getattr(model, MASKS_ATTR, None)


@torch.no_grad()
def merge_adapters(
    model: nn.Module, masks: Optional[MaskSet] = None, safe_merge: bool = True
) -> tuple[nn.Module, MergeReport]:
    """Merge a peft model's LoRA adapters into its base weights and re-apply the masks; return the merged base model
    (with its masks attached, keyed by its own names) and a `MergeReport`.

    Args:
        model: a `PeftModel` with LoRA adapters on a sparse base.
        masks: the base's masks (from the peft model or its base; default: the masks the model carries, e.g. from
            `TicketTrainer(...).masks`, `apply_sparsity` or `load_sparse_adapter`).
        safe_merge: peft's NaN check on the merged weights.
    """
    if not is_peft_model(model) or not hasattr(model, "merge_and_unload"):
        raise ValueError(
            f"merge_adapters takes a peft model (PeftModel with LoRA adapters), got {type(model).__name__}."
        )
    masks = masks if masks is not None else current_masks(model)
    if masks is None:
        raise ValueError(
            "merge_adapters needs the base model's masks: pass masks= (e.g. trainer.masks or load_masks(folder))."
        )
    masks = masks_for(model, masks)
    names = {id(p): n for n, p in model.named_parameters()}
    deltas: dict[str, torch.Tensor] = {}
    for _, layer in lora_layers(model):
        base = base_weight_name(model, layer, names)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                delta = active_delta(layer, adapter).float()
                deltas[base] = deltas[base] + delta if base in deltas else delta
    masked = masked_lora_enabled(model)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    merged_masks = masks_for(merged, masks)
    apply_masks_(merged, merged_masks)
    object.__setattr__(merged, MASKS_ATTR, merged_masks)

    layers, total, removed = {}, 0.0, 0.0
    renamed = dict(zip(masks, merged_masks))
    for name, delta in deltas.items():
        keep = masks[name].to(delta.device) if name in masks else None
        d2 = float(delta.pow(2).sum())
        r2 = float(delta.masked_fill(keep, 0).pow(2).sum()) if keep is not None else 0.0
        layers[renamed.get(name, name)] = {"delta_norm": math.sqrt(d2), "removed_norm": math.sqrt(r2)}
        total, removed = total + d2, removed + r2
    report = MergeReport(math.sqrt(total), math.sqrt(removed), masked, layers)
    logger.info(
        "Merged %d LoRA updates into the sparse base: the masks removed %.2f%% of their norm%s.",
        len(deltas),
        100 * report.removed_fraction,
        " (masked LoRA)" if masked else "",
    )
    return merged, report


# ---- saving and loading ---------------------------------------------------------------------------------------


def save_sparse_adapter(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    masks: Optional[MaskSet] = None,
    sparsity_config: Optional[SparsityConfig] = None,
    **save_kwargs,
) -> None:
    """Write the adapters as peft writes them (`adapter_config.json`, `adapter_model.safetensors`), the base's
    `masks.safetensors` (noting whether masked LoRA was on) and, when given, `sparsity_config.json`.

    The base weights are not written: with a frozen base they are the pretrained weights, and loading applies the
    masks to them again. A base trained next to the adapters is saved by merging (`merge_adapters`) and
    `save_pretrained`. `TicketTrainer.save_model` on a peft model writes the same files.
    """
    if not is_peft_model(model) or not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_sparse_adapter takes a peft model, got {type(model).__name__}.")
    masks = masks if masks is not None else current_masks(model)
    if masks is None:
        raise ValueError("save_sparse_adapter needs the base model's masks: pass masks= (e.g. trainer.masks).")
    params = dict(model.named_parameters())
    trained_base = [n for n in masks_for(model, masks) if params[n].requires_grad]
    if trained_base:
        logger.warning(
            "%d masked base weights are trainable (e.g. %s): the adapter folder does not hold them; save the merged "
            "model (merge_adapters, then save_pretrained) to keep them.",
            len(trained_base),
            trained_base[0],
        )
    model.save_pretrained(save_directory, **save_kwargs)
    masks_for(model, masks).save(save_directory, extra_metadata={"masked_lora": masked_lora_enabled(model)})
    if sparsity_config is not None:
        sparsity_config.save_pretrained(save_directory)


def load_sparse_adapter(
    model: nn.Module,
    adapter: Union[str, os.PathLike],
    masked_lora: Optional[bool] = None,
    is_trainable: bool = False,
    revision: Optional[str] = None,
    **hub_kwargs,
) -> nn.Module:
    """A peft model: `model` (the base, e.g. the pretrained dense model) + the adapters and masks saved in `adapter`
    (a local folder or a Hub repo id, resolved like `load_masks`). The masks are applied to the base weights and
    attached, so `TicketTrainer` and `merge_adapters` use them.

    Args:
        masked_lora: keep the adapters' updates inside the masks; default: as when the folder was saved.
        is_trainable: load the adapters for further training (peft's flag).
    """
    from peft import PeftModel

    masks = load_masks(adapter, revision=revision, **hub_kwargs)
    peft_model = PeftModel.from_pretrained(
        model, str(adapter), is_trainable=is_trainable, revision=revision, **hub_kwargs
    )
    masks = masks_for(peft_model, masks)
    masks.validate_for(peft_model)
    if masked_lora is None:
        masked_lora = str(masks.metadata.get("masked_lora", False)).lower() == "true"
    if masked_lora:
        enable_masked_lora(peft_model, masks)
    apply_masks_(peft_model, masks)
    object.__setattr__(peft_model, MASKS_ATTR, masks)
    return peft_model
