"""`SparsityCallback`: runs a sparsity method's hooks at Trainer events and enforces its masks (through
`hf_tickets.enforce`, the one enforcement path). Its state is saved in every Trainer checkpoint."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .distributed import agree_on_masks, is_sharded, world_size
from .enforce import MaskEnforcer
from .masks import MaskSet
from .methods import BatchSource, SparsityMethod
from .peft_interop import bind_masks
from .sparsify import initial_masks
from .targets import input_dims

logger = logging.getLogger(__name__)


def _batches_from(dataloader: Any) -> BatchSource:
    return None if dataloader is None else (lambda: iter(dataloader))


class SparsityCallback(TrainerCallback, ExportableState):
    """Keep a model sparse during `Trainer.train`, and let a method change its masks.

    Per optimizer step: the method sees the dense gradients (`on_dense_grads`), pruned gradients are zeroed, the
    optimizer steps, the method may return new masks (`after_optimizer_step`), and pruned weights are zeroed
    again. Nothing happens at micro-steps, and a step the AMP GradScaler skipped changes no mask.

    Args:
        masks: the masks to enforce. Optional with `method`: computed from the model then.
        model: the model the masks belong to (default: the `model` Trainer passes to callbacks).
        method: a `SparsityMethod` whose hooks run at Trainer events; None enforces fixed `masks`.

    With a plain `Trainer`: `Trainer(..., callbacks=[SparsityCallback(masks, model)])`; gradients are then masked
    at `on_pre_optimizer_step`, after Trainer's clipping. `TicketTrainer` masks them before clipping (its
    `training_step` calls `dense_grads_ready` after the last micro-step's backward), so that the clipping norm is
    the sparse network's.
    """

    def __init__(
        self,
        masks: Optional[MaskSet] = None,
        model: Optional[nn.Module] = None,
        method: Optional[SparsityMethod] = None,
    ) -> None:
        self.method = method
        self.model = model
        self.masks = masks
        self._enforcer: Optional[MaskEnforcer] = None
        self._grads_masked = False
        self._said_sharding = False  # the FSDP2 line, once per callback
        self._summary: tuple[str, float] = ("", 0.0)  # (fingerprint, overall sparsity) of self.masks
        # Fingerprint of the masks whose per-layer sparsity was last logged: restored on resume, so a resumed run
        # logs `sparsity/<name>` at the same steps as an uninterrupted one.
        self.layer_sparsity_logged_for: Optional[str] = None
        self._collapsed_warned: set[str] = set()
        if masks is not None:
            self._summarise()

    # ---- masks -----------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, batches: BatchSource = None, masks: Optional[MaskSet] = None) -> MaskSet:
        """Bind to `model`: use `masks` or compute the method's initial masks, and zero the pruned weights."""
        if masks is None:
            if self.method is None:
                raise ValueError("SparsityCallback needs masks or a method: pass SparsityCallback(masks, model).")
            masks = initial_masks(model, self.method, batches)
        masks.validate_for(model)
        # Under torch.distributed, rank 0's masks (ranks may have scored their own batches or seeds); DDP then
        # broadcasts rank 0's weights, so every rank trains the same sparse network.
        masks = agree_on_masks(masks, adopt_rank0=True)
        self.model = model
        self.set_masks(masks, _agreed=True)
        return masks

    def set_masks(
        self, masks: MaskSet, optimizer: Optional[torch.optim.Optimizer] = None, _agreed: bool = False
    ) -> None:
        """Enforce `masks` from now on: zero the pruned weights at once (and their optimizer state).

        Under torch.distributed every rank must call it with bitwise-equal masks (checked: a RuntimeError otherwise).
        """
        if not _agreed:
            agree_on_masks(masks, adopt_rank0=False)
        self.masks = masks
        self._enforcer = None
        bind_masks(self.model, masks)  # masked LoRA keeps adapter updates inside the masks enforced now
        self._summarise()
        self._warn_if_collapsed()
        self.enforce_now(optimizer)

    def _warn_if_collapsed(self) -> None:
        """Say when a tensor is pruned so far that the network may be disconnected (once per set of tensors)."""
        collapsed = self.masks.collapsed(input_dims=input_dims(self.model, self.masks) if self.model else None)
        if collapsed and set(collapsed) != self._collapsed_warned:
            self._collapsed_warned = set(collapsed)
            listed = "; ".join(f"{n} {why}" for n, why in list(collapsed.items())[:5])
            logger.warning(
                "Layer collapse: %s%s. The network may be cut and train to a constant. Remedies: exclude the tensor "
                "(exclude_modules), prune layer by layer (scope='layerwise'), lower its rate (layer_rates), or cap "
                "every tensor (max_layer_sparsity=0.99).",
                listed,
                " ..." if len(collapsed) > 5 else "",
            )

    def enforce_now(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero pruned weights (and, with `optimizer`, their optimizer state): after weights or state were loaded."""
        if self.model is None or self._method_projects():
            return
        enforcer = self.enforcer()
        enforcer.mask_weights_()
        enforcer.zero_optimizer_state_(optimizer)

    def _method_projects(self) -> bool:
        """The method trains dense weights and keeps the model at their sparse projection itself (SR-STE)."""
        return self.method is not None and self.method.keeps_dense_weights

    def enforcer(self, model: Optional[nn.Module] = None) -> MaskEnforcer:
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("SparsityCallback needs the model: pass SparsityCallback(masks, model).")
        if self.masks is None:
            raise ValueError(
                "SparsityCallback has no masks (it was rebuilt from a checkpoint without them): pass "
                "SparsityCallback(masks, model), or use TicketTrainer, which restores it."
            )
        if self._enforcer is None or self._enforcer.model is not model:
            self._enforcer = MaskEnforcer(self.masks, model)
        return self._enforcer

    def _summarise(self) -> None:
        report = self.masks.report()
        counts = ",".join(f"{n}:{v['kept']}" for n, v in report["layers"].items())
        self._summary = (hashlib.md5(counts.encode()).hexdigest()[:16], report["sparsity"])

    def log_entries(self) -> dict[str, float]:
        """`sparsity` for every log line; `sparsity/<name>` for the first line after the masks changed."""
        fingerprint, sparsity = self._summary
        entries = {"sparsity": round(sparsity, 6)}
        if self.method is not None:
            entries.update(self.method.log_metrics())
        if self.layer_sparsity_logged_for != fingerprint:
            entries.update({f"sparsity/{n}": round(v, 6) for n, v in self.masks.layer_sparsity().items()})
            self.layer_sparsity_logged_for = fingerprint
        return entries

    # ---- Trainer events --------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is not None and self.model is not None and model is not self.model and self.method is not None:
            # model_init built a new model for this run (or trial): its masks are computed anew.
            logger.info("New model from model_init: computing its masks")
            self.setup(model, _batches_from(train_dataloader))
        elif self.model is None:
            self.model = model
        if self._enforcer is not None:  # prepare() may have replaced the parameters (FSDP2, DeepSpeed): bind anew
            self._enforcer.rebind()
        self._say_sharding()
        if state.global_step > 0:  # resumed from a checkpoint: restore what the checkpoint saved
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(saved, dict):
                self.restore(saved.get("attributes", {}))
        # Weights loaded from a checkpoint, or changed since the masks were made, are zeroed again.
        self.enforce_now(optimizer)
        if self.method is not None:
            self.method.on_train_begin(self.model, self.masks, state.max_steps)

    def _say_sharding(self) -> None:
        """Once per callback: how many masked parameters FSDP2 holds as sharded `DTensor`s (what a launch's log
        shows to prove the masks were cut to shards, not applied to a model FSDP never wrapped)."""
        if self._said_sharding or self.model is None or self.masks is None:
            return
        named = dict(self.model.named_parameters())
        sharded = sum(is_sharded(named[n]) for n in self.masks if n in named)
        if sharded:
            logger.info(
                "FSDP2: %d of %d masked parameters are sharded DTensors on %d ranks; each rank masks its own shards",
                sharded,
                len(self.masks),
                world_size(),
            )
        self._said_sharding = True

    def dense_grads_ready(self, model: nn.Module, step: int) -> None:
        """After the last micro-step's backward: the method sees dense gradients, then they are masked."""
        if self.method is not None:
            self.method.on_dense_grads(model, self.masks, step)
        if not self._method_projects():
            self.enforcer(model).mask_grads_()
        self._grads_masked = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._grads_masked:  # plain Trainer: nobody called dense_grads_ready this step
            self.dense_grads_ready(model if model is not None else self.model, state.global_step + 1)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        model = model if model is not None else self.model
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # AMP GradScaler found inf/NaN
        projects = self._method_projects()
        if self.method is not None and (not skipped or projects):
            new = self.method.after_optimizer_step(model, self.masks, state.global_step + 1)
            if new is not None:
                self.set_masks(new, optimizer)
                control.should_log = True  # every mask update gets its log line (churn, per-layer sparsity)
        # Momentum and weight decay would move pruned weights off zero (frozen weights get no step: left out).
        if not projects:
            enforcer = self.enforcer(model)
            enforcer.mask_weights_(trainable_only=True)
            enforcer.mask_master_weights_()  # DeepSpeed ZeRO-1/2 steps an fp32 copy: masked too
        self._grads_masked = False

    # ---- checkpoint state ------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {
                "method_state": self.method.state_dict() if self.method is not None else {},
                "layer_sparsity_logged_for": self.layer_sparsity_logged_for,
            },
        }

    def restore(self, attributes: dict) -> None:
        """Load what `state()` saved (the masks themselves come from the checkpoint's masks.safetensors)."""
        if self.method is not None and attributes.get("method_state") is not None:
            self.method.load_state_dict(attributes["method_state"])
        self.layer_sparsity_logged_for = attributes.get("layer_sparsity_logged_for")
