"""What peft's wrappers mean for sparsity: which parameters are adapters, how names map between a `PeftModel` and
its base model, and masked LoRA (the adapter's update kept inside the base weight's mask).

peft is optional: nothing here imports it until a model holds peft layers (and a model can only hold them once peft
was imported), so `hf_tickets` imports and runs without it.

Masked LoRA replaces the adapter's contribution ΔW = s·BA of a `lora.Linear` by ΔW with the pruned entries of the base
weight's mask set to zero. It plugs into peft through its LoRA variant slot (`layer.lora_variant[adapter]`, the
mechanism DoRA uses), so peft's own `merge`, `merge_and_unload` and `unmerge` add the masked update: a merge then
leaves every pruned weight at exactly zero, and the merged model computes what the unmerged one did. The masks are
read from a `MaskedLoRA` controller attached to the model, which the enforcement path updates whenever the masks
change (`bind_masks`), so IMP levels and mask updates during training are followed without re-wrapping anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .files import WEIGHTS_NAME
from .masks import MaskSet

CONTROLLER_ATTR = "hf_tickets_masked_lora"  # a plain attribute of the peft model: no state_dict key
_REF_ATTR = "hf_tickets_mask_ref"  # on each lora layer: (controller, name of its base weight)
PEFT_PREFIX = "base_model.model."  # PeftModel -> its tuner -> the user's model


def peft_loaded() -> bool:
    """True once peft was imported by someone: before that, no model can hold peft layers."""
    return sys.modules.get("peft") is not None


def _tuner_layer_types() -> tuple[type, type]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def is_peft_model(model: nn.Module) -> bool:
    """True for a `PeftModel` or any model with peft layers injected (`inject_adapter_in_model`)."""
    if not peft_loaded():
        return False
    tuner, wrapper = _tuner_layer_types()
    return any(isinstance(m, (tuner, wrapper)) for m in model.modules())


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """`id`s of the parameters that belong to peft rather than to the base model.

    That is every parameter of a tuner layer outside its base layer (`lora_A`, `lora_B`, `lora_embedding_*`,
    `lora_magnitude_vector`, IA3 vectors, ...) and everything inside a `modules_to_save` / trainable-tokens wrapper
    (the trained copy, and the frozen original it replaces in the forward). Empty for a model without peft layers.
    """
    if not peft_loaded():
        return set()
    tuner, wrapper = _tuner_layer_types()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, wrapper):
            ids.update(id(p) for p in module.parameters())
        elif isinstance(module, tuner):
            base = {id(p) for p in module.get_base_layer().parameters()}
            ids.update(id(p) for p in module.parameters() if id(p) not in base)
    return ids


# ---- names -----------------------------------------------------------------------------------------------------


def base_parameter_name(name: str) -> str:
    """The base model's name of a parameter of a peft model:
    'base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight'
    -> 'bert.encoder.layer.0.attention.self.query.weight'. Names without peft parts come back unchanged."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return ".".join(part for part in name.split(".") if part != "base_layer")


def masks_for(model: nn.Module, masks: MaskSet) -> MaskSet:
    """`masks` keyed by `model`'s own parameter names, whether they were saved from the peft model or from its base
    (or a merged model). Raises a ValueError naming masks that match no parameter."""
    params = dict(model.named_parameters())
    if all(name in params for name in masks):
        return masks
    by_base: dict[str, str] = {}
    skip = adapter_parameter_ids(model)
    for name, param in params.items():
        if id(param) not in skip:
            by_base.setdefault(base_parameter_name(name), name)
    out, missing = {}, []
    for name, mask in masks.items():
        target = name if name in params else by_base.get(base_parameter_name(name))
        if target is None:
            missing.append(name)
        else:
            out[target] = mask
    if missing:
        raise ValueError(
            f"masks name parameters that {type(model).__name__} does not have, with or without peft's wrappers: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Load masks saved for this base model."
        )
    return MaskSet(out, masks.metadata)


# ---- LoRA layers -----------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module name, layer) for every peft LoRA layer of `model`."""
    if not peft_loaded():
        return
    from peft.tuners.lora.layer import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def base_weight_name(model: nn.Module, layer: nn.Module, names: Optional[Mapping[int, str]] = None) -> str:
    """`named_parameters()` name of the base weight a LoRA layer adapts."""
    names = names if names is not None else {id(p): n for n, p in model.named_parameters()}
    return names[id(layer.get_base_layer().weight)]


def raw_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """s·BA of one adapter, in the base weight's layout (peft's own product; a variant changes merges and the forward,
    not this)."""
    return layer.get_delta_weight(adapter)


def _masked_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    delta = raw_delta(layer, adapter)
    ref = getattr(layer, _REF_ATTR, None)
    keep = ref[0].mask(ref[1], delta.device) if ref is not None else None
    # Written zeros, not a product: a NaN in BA at a pruned entry cannot reach the merged weight (DESIGN principle 9).
    return delta if keep is None else delta.masked_fill(~keep, 0)


def active_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """The update this adapter adds to the base weight in the forward: s·BA, masked under masked LoRA."""
    return _masked_delta(layer, adapter) if is_masked_lora_layer(layer, adapter) else raw_delta(layer, adapter)


def _variant_class() -> type:
    """peft's `LoraVariant` subclass for masked LoRA (built on first use: peft is imported then)."""
    global _MASKED_VARIANT
    if _MASKED_VARIANT is not None:
        return _MASKED_VARIANT
    try:
        from peft.tuners.lora.layer import LoraVariant
    except ImportError as err:  # pragma: no cover - depends on the installed peft
        raise ImportError("masked LoRA needs peft>=0.15 (LoRA variants): pip install -U peft") from err
    from peft.utils.other import transpose

    class MaskedLoraVariant(LoraVariant):
        """y = base(x) + dropout(x) (s·BA ⊙ M)ᵀ, and merges that add s·BA ⊙ M: nothing outside the mask."""

        @staticmethod
        def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            pass

        @staticmethod
        def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
            orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight.data - _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def forward(
            module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
        ) -> torch.Tensor:
            # One dense [out, in] product per layer: the cost of keeping ΔW inside the mask (as DoRA pays one too).
            delta = transpose(_masked_delta(module, active_adapter), module.fan_in_fan_out)
            x = module.lora_dropout[active_adapter](x)
            return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)

        def supports_lora_conversion(self) -> bool:
            return False

    _MASKED_VARIANT = MaskedLoraVariant
    return MaskedLoraVariant


_MASKED_VARIANT: Optional[type] = None


def is_masked_lora_layer(layer: nn.Module, adapter: str) -> bool:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return _MASKED_VARIANT is not None and isinstance(variant, _MASKED_VARIANT)


class MaskedLoRA:
    """The masks masked-LoRA layers read: name of a base weight -> its current mask, moved to devices on demand.

    One per model (`model.hf_tickets_masked_lora`); `bind_masks` gives it new masks whenever the enforced masks
    change. A base weight without a mask (not pruned) lets its adapter's update through whole.
    """

    def __init__(self, masks: Optional[MaskSet] = None) -> None:
        self.masks: Optional[MaskSet] = None
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks: MaskSet) -> None:
        self.masks = masks
        self._on_device = {}

    def mask(self, name: str, device: torch.device) -> Optional[torch.Tensor]:
        if self.masks is None or name not in self.masks:
            return None
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self.masks[name].to(device)
        return self._on_device[key]


def enable_masked_lora(model: nn.Module, masks: Optional[MaskSet] = None) -> MaskedLoRA:
    """Keep every LoRA adapter's update of `model` inside its base weight's mask (ΔW ⊙ M in the forward and in
    merges), so that merging adds nothing a mask prunes.

    Call it on a peft model before training (or after loading adapters); `TicketTrainer` and `apply_sparsity` then
    give it their masks and every later mask change. `masks` binds masks at once (e.g. from `load_masks`). Only
    `lora.Linear` layers (nn.Linear and transformers' Conv1D bases) are supported; other LoRA layers, and adapters
    that already use a LoRA variant (DoRA, ...), raise a ValueError.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layer: wrap it with peft.get_peft_model(model, LoraConfig(...))."
        )
    from peft.tuners.lora.layer import Linear

    variant = _variant_class()()
    controller = getattr(model, CONTROLLER_ATTR, None) or MaskedLoRA()
    names = {id(p): n for n, p in model.named_parameters()}
    for module_name, layer in layers:
        if type(layer) is not Linear:
            raise ValueError(
                f"masked LoRA supports LoRA on Linear layers; {module_name!r} is a {type(layer).__name__}: leave it "
                "out of LoraConfig.target_modules (or exclude it from pruning and train it unmasked)."
            )
        for adapter in layer.lora_A:
            current = layer.lora_variant.get(adapter)
            if current is not None and not isinstance(current, type(variant)):
                raise ValueError(
                    f"adapter {adapter!r} of {module_name!r} already uses the LoRA variant {type(current).__name__} "
                    "(e.g. use_dora=True): masked LoRA cannot be combined with it."
                )
            if adapter in getattr(layer, "merged_adapters", []):
                raise ValueError(f"adapter {adapter!r} of {module_name!r} is merged: unmerge it before masking it.")
            layer.lora_variant[adapter] = variant
        object.__setattr__(layer, _REF_ATTR, (controller, base_weight_name(model, layer, names)))
    object.__setattr__(model, CONTROLLER_ATTR, controller)
    if masks is not None:
        controller.set_masks(masks_for(model, masks))
    return controller


def masked_lora_enabled(model: nn.Module) -> bool:
    return getattr(model, CONTROLLER_ATTR, None) is not None


def bind_masks(model: Optional[nn.Module], masks: MaskSet) -> None:
    """Tell a masked-LoRA model which masks are enforced now (the enforcement path calls it at every change)."""
    controller = getattr(model, CONTROLLER_ATTR, None) if model is not None else None
    if controller is not None:
        controller.set_masks(masks)
        # Saved with the masks (TicketTrainer.save_model too), so that loading turns masked LoRA on again.
        masks.metadata["masked_lora"] = True


@contextlib.contextmanager
def effective_weights(model: nn.Module, names: Optional[set[str]] = None) -> Iterator[None]:
    """Within the block, each adapted base weight holds W + ΔW (the update the forward adds: masked under masked
    LoRA); afterwards the exact previous values are copied back. Methods that score weights (magnitude, IMP,
    gradual, RigL's drop) then rank what the model computes with, not the frozen W alone. `names`: only these
    base weights."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    param_names = {id(p): n for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for _, layer in lora_layers(model):
                weight = layer.get_base_layer().weight
                if names is not None and param_names.get(id(weight)) not in names:
                    continue
                adapters = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
                if not adapters:
                    continue
                saved.append((weight, weight.detach().clone()))
                for adapter in adapters:
                    weight.add_(active_delta(layer, adapter).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def wrap_with_lora(model: nn.Module, section: Mapping[str, Any]) -> nn.Module:
    """A recipe's `peft:` section applied: `peft.get_peft_model(model, LoraConfig(**fields))`, and masked LoRA on
    with `masked: true`. `task_type` defaults to SEQ_CLS for a `*ForSequenceClassification` model (peft then trains
    its classifier in full, as `modules_to_save`). Bad keys or values raise a ValueError naming the `peft.` key."""
    if not isinstance(section, Mapping):
        raise ValueError(f"recipe section 'peft' must be a mapping of LoraConfig fields, got {section!r}.")
    fields = dict(section)
    masked = fields.pop("masked", False)
    if not isinstance(masked, bool):
        raise ValueError(f"recipe peft.masked={masked!r} must be true or false.")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("the recipe's peft section needs peft: pip install 'hf_tickets[peft]'") from err
    if "task_type" not in fields and type(model).__name__.endswith("ForSequenceClassification"):
        fields["task_type"] = "SEQ_CLS"
    try:
        config = LoraConfig(**fields)
    except TypeError as err:
        raise ValueError(f"recipe section 'peft' does not fit peft.LoraConfig: {err}") from err
    except ValueError as err:
        raise ValueError(f"recipe section 'peft': {err}") from err
    wrapped = get_peft_model(model, config)
    if masked:
        enable_masked_lora(wrapped)
    return wrapped


# ---- adapter folders (what Trainer and save_pretrained write for a peft model) ---------------------------------

# peft's file name (peft.utils.SAFETENSORS_WEIGHTS_NAME), spelt out because peft is an optional dependency
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def is_adapter_folder(path: str) -> bool:
    """A folder holding peft adapter weights and no full `model.safetensors` (a peft model's checkpoint)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_NAME))
        and not os.path.isfile(os.path.join(path, WEIGHTS_NAME))
    )


def load_adapter_folder_(model: nn.Module, folder: str) -> dict[str, torch.Tensor]:
    """Load the adapter weights (and `modules_to_save`) saved in `folder` into the peft model `model`, in place, with
    peft's own loader (`load_peft_weights`, `set_peft_model_state_dict`: it maps the saved names back, adapter name
    included). Returns the tensors it set, keyed by `model`'s state_dict names. The base weights are untouched: the
    folder does not hold them."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapters = list(getattr(model, "peft_config", {}) or [])
    if len(adapters) != 1:
        raise ValueError(
            f"{folder}: loading adapter weights needs a peft model with exactly one adapter, got {adapters}."
        )
    device = next(model.parameters()).device
    saved = load_peft_weights(folder, device=str(device))
    result = set_peft_model_state_dict(model, saved, adapter_name=adapters[0])
    if result.unexpected_keys:
        raise ValueError(
            f"{folder} holds adapter weights {sorted(result.unexpected_keys)[:3]} that {type(model).__name__} does "
            "not have: it was saved for another adapter configuration."
        )
    missing = set(result.missing_keys)
    loaded = {name: t.detach() for name, t in model.state_dict().items() if name not in missing}
    if not loaded:
        raise ValueError(f"{folder} holds no adapter weights of {type(model).__name__}.")
    return loaded
