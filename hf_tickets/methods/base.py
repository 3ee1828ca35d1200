"""The method interface and its registry: one file per method, registered with one call (like peft's
`register_peft_method`).

A method decides masks; it never writes zeros (that is `hf_tickets.enforce`, the one enforcement path). The
`SparsityCallback` calls its hooks at Trainer events, in this order within one optimizer step:

    train begin -> on_train_begin (max_steps known: schedules)
    backward of the last micro-step -> on_dense_grads (gradients still dense) -> enforce: mask gradients -> clip
    -> optimizer.step -> after_optimizer_step (may return new masks) -> enforce: re-mask weights
       (+ zero optimizer state of pruned entries when the masks changed)

Iterative methods (`iterative = True`) are trained level by level by `hf_tickets.lottery`; `next_level_masks` is
called between levels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Optional

from torch import nn

from ..config import SparsityConfig, register_config_class

if TYPE_CHECKING:
    import torch

    from ..masks import MaskSet

# A fresh iterator over training batches (dicts of tensors on the model's device), from the trainer's own train
# dataloader; None when the trainer has no training data.
BatchSource = Optional[Callable[[], Iterable[dict]]]

_REGISTRY: dict[str, type["SparsityMethod"]] = {}


class SparsityMethod:
    """Base class of every sparsity method. Override `initial_masks`; training-time methods override the hooks.

    Class attributes:
        config_class: the method's config (`SparsityConfig` or a subclass holding the method's own fields and their
            validation in `validate_method`).
        iterative: trained level by level (train, `next_level_masks`, rewind, train again) by `hf_tickets.lottery`.
        needs_data: `initial_masks` reads training batches (SNIP, GraSP): it gets `batches` from the trainer.
        sanity_checks: the values of `SparsityConfig.sanity_check` the method accepts (Frankle et al. 2021's
            controls, for masks chosen once at initialization). `"shuffle"` and `"reinit"` are applied to any
            method's initial masks by `hf_tickets.sparsify` (see `hf_tickets.sanity`); `"invert"` is the method's
            own job: rank by `hf_tickets.sanity.oriented(scores, config)` so that the lowest scores are kept.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SparsityConfig]] = SparsityConfig
    iterative: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
    # True for a method that trains dense weights and keeps the model's weights at their sparse projection itself
    # between optimizer steps (SR-STE): the callback then neither masks gradients nor zeroes weights or optimizer
    # state, and calls `after_optimizer_step` after a step the GradScaler skipped too (nothing moved: re-project).
    keeps_dense_weights: bool = False
    # True when every mask change inside `Trainer.train` is computed exactly from FSDP2 shards (`hf_tickets.sharded`):
    # such a method runs under FSDP2 although it has step hooks (gradual magnitude pruning, RigL, SET).
    updates_from_shards: ClassVar[bool] = False
    sanity_checks: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SparsityConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ValueError(
                f"method {self.name!r} needs a {self.config_class.__name__}, got {type(config).__name__}: build it "
                f"with SparsityConfig(method={self.name!r}, ...)."
            )
        self.config = config

    # ---- hooks -----------------------------------------------------------------------------------------------

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> "MaskSet":
        """The masks training starts with. `targets` are the prunable parameters (name -> parameter)."""
        raise NotImplementedError(f"sparsity method {self.name!r} must implement initial_masks")

    def on_train_begin(self, model: nn.Module, masks: "MaskSet", max_steps: int) -> None:
        """A `train()` call starts (fresh or resumed); `max_steps` is its total optimizer steps, for schedules."""

    def on_dense_grads(self, model: nn.Module, masks: "MaskSet", step: int) -> None:
        """After the last micro-step's backward of optimizer step `step` (1-based), before gradients are masked
        and clipped: `p.grad` still holds the dense gradient (RigL grows connections from it)."""

    def after_optimizer_step(self, model: nn.Module, masks: "MaskSet", step: int) -> Optional["MaskSet"]:
        """After optimizer step `step` (1-based; not called for a step the AMP GradScaler skipped). Return new
        masks to change them (the enforcement path zeroes newly pruned weights and their optimizer state), or
        None to keep them."""
        return None

    def next_level_masks(self, model: nn.Module, masks: "MaskSet", level: int) -> "MaskSet":
        """Iterative methods: the masks of `level`, from the model trained at `level - 1` under `masks`."""
        raise NotImplementedError(f"sparsity method {self.name!r} is not iterative")

    def before_save(self, model: nn.Module, masks: "MaskSet") -> None:
        """Right before the model and its masks are written (every checkpoint and `save_model`): bring the model
        into its saved form and check it. The default checks an N:M pattern (`hf_tickets.nm.validate_nm`): a
        group holding more than N nonzeros, or a nonzero pruned weight, raises a ValueError and nothing is
        written."""
        if self.config.nm is not None and len(masks):
            from ..nm import check_tensors

            params = dict(model.named_parameters())
            dims = masks.metadata.get("nm_dims") or {}
            if len(dims) < len(masks):
                from ..nm import nm_dims

                dims = nm_dims(model, list(masks))
            check_tensors(params, dims, self.config.nm, masks).raise_if_invalid(
                f"{type(model).__name__} (before saving)"
            )

    def log_metrics(self) -> dict[str, float]:
        """Values added to the next Trainer log line (e.g. mask churn after an update); empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (counters, RNG) saved in every Trainer checkpoint; masks are saved apart."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (on resume from a checkpoint)."""

    def state_tensors(self) -> dict[str, "torch.Tensor"]:
        """Tensor state too large for JSON (e.g. a per-weight history); saved as `sparsity_state.safetensors` in
        every checkpoint next to the masks."""
        return {}

    def load_state_tensors(self, tensors: dict[str, "torch.Tensor"]) -> None:
        """Restore what `state_tensors` returned (on resume from a checkpoint)."""

    # ---- helpers ---------------------------------------------------------------------------------------------

    def acts_during_training(self) -> bool:
        """True when a training-time hook is overridden: the callback must run even while nothing is pruned."""
        return self.iterative or self.has_step_hooks()

    def has_step_hooks(self) -> bool:
        """True when a hook that runs inside `Trainer.train` is overridden (RigL, SET, gradual, SR-STE): such a
        method sees dense gradients or weights between steps, which FSDP2 holds only as shards. IMP changes masks
        only between levels and has none."""
        cls = type(self)
        return (
            cls.on_train_begin is not SparsityMethod.on_train_begin
            or cls.on_dense_grads is not SparsityMethod.on_dense_grads
            or cls.after_optimizer_step is not SparsityMethod.after_optimizer_step
        )

    def mask_metadata(self, **extra: object) -> dict[str, object]:
        """What is stored with the masks: the method and the config fields that shaped them."""
        cfg = self.config
        meta = {"method": self.name, "pattern": cfg.pattern, "scope": cfg.scope, "seed": cfg.seed}
        for name in ("max_layer_sparsity", "sanity_check"):  # only when set: older mask files stay as they were
            if getattr(cfg, name, None) is not None:
                meta[name] = getattr(cfg, name)
        return {**meta, **extra}


def register_method(
    name: str, config_cls: type[SparsityConfig], method_cls: type[SparsityMethod]
) -> type[SparsityMethod]:
    """Register a method: `SparsityConfig(method=name, ...)` then builds `config_cls` and trains with `method_cls`.

    A name can be registered once (re-registering the same classes is a no-op, so a module may be re-imported).
    """
    if not (isinstance(method_cls, type) and issubclass(method_cls, SparsityMethod)):
        raise TypeError(f"method class for {name!r} must subclass SparsityMethod, got {method_cls!r}.")
    previous = _REGISTRY.get(name)
    if previous is not None and (previous is not method_cls or previous.config_class is not config_cls):
        raise ValueError(f"sparsity method {name!r} is already registered by {previous.__name__}")
    register_config_class(name, config_cls, method_cls.sanity_checks)
    method_cls.name = name
    method_cls.config_class = config_cls
    _REGISTRY[name] = method_cls
    return method_cls


def get_method(name: str) -> type[SparsityMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"SparsityConfig.method={name!r} is unknown: choose one of {available_methods()}.")
    return _REGISTRY[name]


def build_method(config: SparsityConfig) -> SparsityMethod:
    """The method object for `config` (one per trainer: it holds the method's state)."""
    return get_method(config.method)(config)


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
