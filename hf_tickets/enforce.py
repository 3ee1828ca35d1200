"""The one enforcement path: the only code in hf_tickets that writes zeros into weights, gradients or optimizer state.

Every training path uses it: `SparsityCallback` (one network under `Trainer`) through `MaskEnforcer`, and the
batched engine (K stacked networks in one flat buffer) through `zero_pruned_flat_`. The rule is the same
everywhere (DESIGN.md principles 1, 2 and 9):

* pruned gradients are zeroed after the last micro-step's backward, before clipping and the optimizer step;
* pruned weights are zeroed after every optimizer step (momentum and weight decay would move them);
* optimizer state of pruned entries is zeroed when the masks change (a restored or old momentum cannot revive them);
* zeros are *written* (`masked_fill_` / a store), never multiplied in, so a NaN or inf cannot survive in a pruned
  entry.

On CUDA the per-step work is one kernel launch for all gradients and one for all weights (`kernels.py`).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from .distributed import is_sharded, local, local_mask, zero_master_weights_
from .kernels import MultiTensorMasker
from .masks import MaskSet


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class MaskEnforcer:
    """Binds a `MaskSet` to a model's parameters and keeps the pruned entries at exactly zero.

    The parameter list, the masks moved next to their parameters and the kernel's launch tables are built once and
    rebuilt only when the model is another object, was moved to another device, or `rebind()` is called (FSDP2 and
    DeepSpeed replace the parameter objects when the model is prepared: masks bound to the old ones mask nothing).

    FSDP2 parameters are `DTensor`s: each rank then holds the shard of every mask that matches its shard of the
    parameter, and every write below is a local `masked_fill_` on `to_local()` views (no communication).
    """

    def __init__(self, masks: MaskSet, model: nn.Module) -> None:
        self.masks = masks
        self._model = weakref.ref(model)
        self._params: list[torch.Tensor] = []
        self._masker: Optional[MultiTensorMasker] = None
        self._device: Optional[torch.device] = None
        self._local = _same  # `local` when some parameter is an FSDP2 shard; skipped per tensor otherwise (host time)

    def rebind(self) -> None:
        """Bind to the model's current parameter objects at the next call (after a wrapper replaced them)."""
        self._masker = None

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model this MaskEnforcer was bound to no longer exists: bind the masks again.")
        return model

    def _bound(self) -> tuple[list[torch.Tensor], MultiTensorMasker]:
        params = self._params
        # Module.to() keeps the Parameter objects but moves their storage: rebind when the device changed.
        if self._masker is None or (params and params[0].device != self._device):
            model = self.model
            self.masks.validate_for(model)
            named = dict(model.named_parameters())
            self._params = [named[n] for n in self.masks]
            keep = [local_mask(self.masks[n], p).contiguous() for n, p in zip(self.masks, self._params)]
            self._masker = MultiTensorMasker(keep)
            self._device = self._params[0].device if self._params else None
            self._local = local if any(map(is_sharded, self._params)) else _same
        return self._params, self._masker

    def local_masks(self) -> list[torch.Tensor]:
        """Each mask as this rank holds it (its parameter's shard under FSDP2), in `masks` order."""
        return self._bound()[1].masks

    def mask_weights_(self, trainable_only: bool = False) -> None:
        """Zero every pruned weight in place.

        `trainable_only` (the per-step call after `optimizer.step`) leaves out parameters with
        `requires_grad=False`: the optimizer never moves them (they get no gradient), so a frozen sparse base, as under
        LoRA, stays exactly sparse from the last full pass (mask change, train begin) at no per-step cost.
        """
        params, masker = self._bound()
        if not params:
            return
        if trainable_only:
            trainable = [i for i, p in enumerate(params) if p.requires_grad]
            if len(trainable) < len(params):
                if trainable:
                    masker.subset(trainable).zero_pruned_([self._local(params[i]) for i in trainable])
                return
        masker.zero_pruned_(list(map(self._local, params)))

    def mask_master_weights_(self) -> None:
        """Zero the pruned entries of DeepSpeed ZeRO-1/2's fp32 master weights and their optimizer state: ZeRO
        copies its master weights into the module after every step, so zeros in the module alone would not last.
        Does nothing for parameters DeepSpeed does not manage."""
        params, masker = self._bound()
        if params and any(getattr(p, "_hp_mapping", None) is not None for p in params):
            zero_master_weights_(params, masker.masks)

    def mask_grads_(self) -> None:
        """Zero the gradients of pruned weights in place; parameters without a gradient are skipped."""
        params, masker = self._bound()
        to_local = self._local
        grads = [None if p.grad is None else to_local(p.grad) for p in params]
        if all(g is not None for g in grads):
            if grads:
                masker.zero_pruned_(grads)
            return
        present = [i for i, g in enumerate(grads) if g is not None]
        if present:
            masker.subset(present).zero_pruned_([grads[i] for i in present])

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Zero the per-weight optimizer state (momentum, Adam moments) of pruned entries.

        Runs when the masks change, not every step: between changes the pruned gradients are zero, so SGD momentum
        and Adam's moments of pruned entries stay zero by themselves (tested in tests/test_enforce.py).
        """
        if optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        params, masker = self._bound()
        for param, keep in zip(params, masker.masks):
            state = inner.state.get(param)
            if not state:
                continue
            pruned = None
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    if pruned is None:
                        pruned = ~keep
                    local(value).masked_fill_(pruned.to(local(value).device), 0)

    def count_violations(self) -> int:
        """Pruned weights that are not exactly zero (0 while the masks are enforced)."""
        params, masker = self._bound()
        return int(sum(int((local(p.detach())[~keep] != 0).sum()) for p, keep in zip(params, masker.masks)))


def apply_masks_(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Zero the pruned weights of `model` once (a one-off; training paths keep a `MaskEnforcer`)."""
    MaskEnforcer(masks, model).mask_weights_()
    return model


def count_violations(model: nn.Module, masks: MaskSet) -> int:
    """Pruned weights of `model` that are not exactly zero."""
    return MaskEnforcer(masks, model).count_violations()


@torch.no_grad()
def zero_pruned_flat_(tensors: Sequence[torch.Tensor], pruned: torch.Tensor) -> None:
    """The batched engine's form: K networks' weights (or gradients, or optimizer buffers) in flat buffers of the
    same layout as `pruned` (True = pruned). Plain `masked_fill_`, so it stays capturable in a CUDA graph."""
    for tensor in tensors:
        tensor.masked_fill_(pruned, 0)
