"""Which parameters of a model are prunable, with peft's module-name matching rules."""

from __future__ import annotations

import logging
import re
from typing import Iterable, Optional, Union

from torch import nn

from .config import SparsityConfig
from .peft_interop import adapter_parameter_ids, base_parameter_name

logger = logging.getLogger(__name__)

try:  # transformers' GPT-2 style linear layer (weight stored transposed)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

DEFAULT_TARGET_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + (
    (Conv1D,) if isinstance(Conv1D, type) else ()
)


def module_matches(name: str, spec: Union[str, Iterable[str]]) -> bool:
    """peft's rule: a string is a regex that must fully match; a list matches exactly or as a `.`-suffix.

    Inside a peft model a name also matches as the base model's name ('base_model.model.' and '.base_layer' left
    out), so the names a user wrote for the base model keep working after `get_peft_model`."""
    names = {name, base_parameter_name(name)}
    if isinstance(spec, str):
        return any(re.fullmatch(spec, n) is not None for n in names)
    spec = list(spec)
    return any(n == key or n.endswith("." + key) for n in names for key in spec)


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def resolve_targets(model: nn.Module, config: SparsityConfig) -> dict[str, nn.Parameter]:
    """Map parameter name -> parameter for every weight `config` prunes, in `named_parameters()` order.

    Without `target_modules`, the weights of Linear / Conv / Conv1D modules are targeted, classifier and LM heads
    included, except a head whose weight is tied to an input embedding (pruning it would prune the embedding).
    Biases, norms and embeddings are only pruned when `target_modules` names their module explicitly.

    On a peft model the targets are the base model's weights, reached through peft's wrappers (a LoRA layer's
    `base_layer.weight`; naming the wrapper, e.g. `query`, targets its base weight). Adapter weights (`lora_A`,
    `lora_B`, ...) and `modules_to_save` copies are never targeted, even by a `target_modules` regex that
    matches them: they stay dense and trainable.
    """
    explicit = config.target_modules is not None
    embedding_ids = _embedding_weight_ids(model)
    adapter_ids = adapter_parameter_ids(model)
    param_ids: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    chosen: dict[int, str] = {}
    matched_any = False
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in param_ids or id(weight) in adapter_ids:
            continue
        if explicit:
            if not module_matches(module_name, config.target_modules):
                continue
            matched_any = True
        else:
            if not isinstance(module, DEFAULT_TARGET_TYPES) or id(weight) in embedding_ids:
                continue
        if config.exclude_modules is not None and module_matches(module_name, config.exclude_modules):
            continue
        chosen[id(weight)] = param_ids[id(weight)]

    _check_excludes_match(model, config.exclude_modules)
    if explicit and not matched_any:
        raise ValueError(
            f"SparsityConfig.target_modules={config.target_modules!r} matches no module with a weight in "
            f"{type(model).__name__}: use module names from model.named_modules(), e.g. "
            f"{_example_names(model)}."
            + (" peft adapter weights (lora_A, lora_B, modules_to_save) are never pruned." if adapter_ids else "")
        )
    if not chosen and not explicit and config.exclude_modules is None:
        # Trainer takes any nn.Module; a model without Linear/Conv weights trains dense, as it would there.
        logger.warning(
            "%s has no Linear/Conv weight to prune: it trains dense. Name target_modules to prune other weights.",
            type(model).__name__,
        )
        return {}
    if not chosen:
        raise ValueError(
            f"No prunable weight left in {type(model).__name__} after target_modules={config.target_modules!r} and "
            f"exclude_modules={config.exclude_modules!r}: loosen exclude_modules or name target_modules."
        )
    return {name: param for name, param in model.named_parameters() if id(param) in chosen}


def _check_excludes_match(model: nn.Module, exclude_modules) -> None:
    """A misspelt exclude_modules entry would silently prune what the user meant to keep: each must match."""
    if exclude_modules is None:
        return
    # a string is one regex; a list holds names, each matched on its own
    specs = [exclude_modules] if isinstance(exclude_modules, str) else [[p] for p in exclude_modules]
    weighted = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    unused = [s if isinstance(s, str) else s[0] for s in specs if not any(module_matches(n, s) for n in weighted)]
    if unused:
        raise ValueError(
            f"SparsityConfig.exclude_modules entries {unused} match no module with a weight in "
            f"{type(model).__name__}: use module names from model.named_modules(), e.g. {_example_names(model)}."
        )


def _example_names(model: nn.Module, limit: int = 4) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, DEFAULT_TARGET_TYPES)]
    return names[:limit]


def module_name_of(param_name: str) -> str:
    """'bert.encoder.layer.0.output.dense.weight' -> 'bert.encoder.layer.0.output.dense'."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def rate_factor(param_name: str, layer_rates: Optional[dict]) -> Optional[float]:
    """The `layer_rates` factor of the first regex fully matching this parameter's module, or None."""
    if not layer_rates:
        return None
    module = module_name_of(param_name)
    for pattern, factor in layer_rates.items():
        if module_matches(module, pattern) or module_matches(module, [pattern]):
            return float(factor)
    return None


def input_dims(model: nn.Module, targets: dict[str, nn.Parameter]) -> dict[str, int]:
    """The input-feature dimension of each targeted weight: 1 ([out, in, ...]), or 0 for Conv1D ([in, out])."""
    out = {}
    for name in targets:
        module = model.get_submodule(module_name_of(name))
        out[name] = 0 if isinstance(Conv1D, type) and isinstance(module, Conv1D) else 1
    return out
