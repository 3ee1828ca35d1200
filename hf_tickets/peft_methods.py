"""Sparsity methods on the base weights of a peft (LoRA) model: which combinations can hold, and scoring the
weights the model computes with (W + ΔW) rather than the frozen W alone."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .masks import MaskSet
from .methods.base import BatchSource, SparsityMethod
from .peft_interop import adapter_parameter_ids, effective_weights, is_peft_model
from .targets import resolve_targets

# Methods that bring pruned weights back during training. A revived weight restarts at zero and only a trainable
# weight can move off it, so on a frozen base they would only ever drop weights (and RigL has no gradient to grow by).
GROWING_METHODS = ("rigl", "set")


def prepare_method(model: nn.Module, method: SparsityMethod) -> SparsityMethod:
    """`method`, ready for `model`: unchanged for a model without peft layers. For a peft model, combinations that
    cannot hold raise a ValueError, and the method is wrapped so that it scores W + ΔW (`OnEffectiveWeights`)."""
    if not is_peft_model(model):
        return method
    check_method(model, method)
    return OnEffectiveWeights(method)


def check_method(model: nn.Module, method: SparsityMethod) -> None:
    """Reject a method that cannot work on this peft model's base weights, before anything is trained."""
    cfg = method.config
    if method.iterative:
        check_iterative(model, cfg.method)
    reads_grads = type(method).on_dense_grads is not SparsityMethod.on_dense_grads
    if cfg.method in GROWING_METHODS or reads_grads:
        targets = resolve_targets(model, cfg)
        frozen = [n for n, p in targets.items() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"SparsityConfig.method={cfg.method!r} "
                + ("grows weights from the base weights' gradients" if reads_grads else "regrows pruned weights")
                + f", but {len(frozen)} targeted base weights of this peft model are frozen (e.g. {frozen[0]!r}): "
                "they get no gradient, so a regrown weight would stay 0. On a frozen LoRA base use a method that "
                "only prunes (magnitude, random, N:M, imp, gradual, snip), or unfreeze the targeted base weights "
                "(param.requires_grad_(True)) to train them sparse next to the adapters."
            )


def check_iterative(model: nn.Module, method: str) -> None:
    """IMP on a peft model trains the adapters (and modules_to_save) at each level and rewinds them; the base is
    frozen theta_0 under the level's masks. The level folders and rewind point hold what peft saves, so anything
    else that trains would be lost between levels: refused."""
    adapters = list(getattr(model, "peft_config", {}) or [])
    if len(adapters) != 1:
        raise ValueError(
            f"SparsityConfig.method={method!r} on a peft model needs exactly one adapter (a PeftModel from "
            f"get_peft_model), got adapters {adapters}."
        )
    peft_ids = adapter_parameter_ids(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in peft_ids]
    if trained:
        raise ValueError(
            f"SparsityConfig.method={method!r} on a peft model rewinds what peft saves (adapters and "
            f"modules_to_save), but {len(trained)} base weights are trainable (e.g. {trained[0]!r}): they would be "
            "lost between levels. Freeze them (param.requires_grad_(False)), or list their modules in "
            "LoraConfig.modules_to_save."
        )


class OnEffectiveWeights(SparsityMethod):
    """Runs `inner` with each adapted base weight holding W + ΔW whenever it may score weights (initial masks, mask
    updates after optimizer steps, IMP's next level); the exact W is put back right after. Everything else is
    `inner`'s: its config, state, log lines and gradient hook (gradients are those of W, untouched)."""

    def __init__(self, inner: SparsityMethod) -> None:
        self.inner = inner
        self.config = inner.config
        self.name = inner.name  # type: ignore[misc]  (instance value of the class attribute)
        self.iterative = inner.iterative  # type: ignore[misc]
        self.needs_data = inner.needs_data  # type: ignore[misc]
        self._scores_after_step = type(inner).after_optimizer_step is not SparsityMethod.after_optimizer_step

    def __getattr__(self, name: str) -> Any:  # a method's own attributes (e.g. RigL's schedule) stay reachable
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        with effective_weights(model, set(targets)):
            return self.inner.initial_masks(model, targets, batches)

    def on_train_begin(self, model: nn.Module, masks: MaskSet, max_steps: int) -> None:
        self.inner.on_train_begin(model, masks, max_steps)

    def on_dense_grads(self, model: nn.Module, masks: MaskSet, step: int) -> None:
        self.inner.on_dense_grads(model, masks, step)

    def after_optimizer_step(self, model: nn.Module, masks: MaskSet, step: int) -> Optional[MaskSet]:
        if not self._scores_after_step:
            return None
        with effective_weights(model, set(masks)):
            return self.inner.after_optimizer_step(model, masks, step)

    def next_level_masks(self, model: nn.Module, masks: MaskSet, level: int) -> MaskSet:
        with effective_weights(model, set(masks)):
            return self.inner.next_level_masks(model, masks, level)

    def log_metrics(self) -> dict[str, float]:
        return self.inner.log_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def state_tensors(self) -> dict:
        return self.inner.state_tensors()

    def load_state_tensors(self, tensors: dict) -> None:
        self.inner.load_state_tensors(tensors)

    def acts_during_training(self) -> bool:
        return self.inner.acts_during_training()

    def mask_metadata(self, **extra: object) -> dict[str, object]:
        return self.inner.mask_metadata(**extra)
