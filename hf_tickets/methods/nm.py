"""N:M sparse training: a fixed one-shot mask (NVIDIA's ASP recipe), periodic recomputation, and SR-STE.

* `method="nm"` (default pattern "2:4"): N:M magnitude masks.
  - `update_interval=None` (default): ASP. The mask is chosen once, by magnitude, from the (pretrained or
    trained) weights, and kept while the model is fine-tuned: the enforcement path zeroes pruned gradients and
    weights at every optimizer step, exactly as for any fixed mask.
  - `update_interval=k`: periodic recomputation. Dense weights are kept and trained; the model's weights are their
    N:M projection, whose mask is recomputed from the dense weights' magnitudes every k optimizer steps; gradients
    pass straight through the projection (STE). `sr_decay` adds SR-STE's decay.
* `method="sr_ste"` (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch"): the same with the mask recomputed at every step (`update_interval=1`) and the sparse-refined decay
  `sr_decay` (lambda_W, 2e-4): the gradient of a pruned weight gets + lambda_W * w, pulling pruned weights toward 0
  so that the mask settles. Biases are never targeted, so never decayed.

Why SR-STE is the one method that projects in the forward pass. Every other method trains the weights it keeps
and holds pruned weights at exactly 0. SR-STE's point is the opposite: the pruned weights keep training (from the
straight-through gradient), so that the N:M choice inside each group can change as they grow past the kept ones.
That needs dense weights that the forward pass never sees. They are kept here, outside the module tree (no hooks,
no parametrization, state_dict keys unchanged): between optimizer steps the model's weights *are* the N:M
projection of the dense weights, so the forward pass, `evaluate`, every checkpoint and `save_model` see exact N:M
weights. For the update, the dense weights are swapped in after the last backward (`on_dense_grads`, where the
decay is added to the gradient, before clipping, as in the reference code's backward), the optimizer steps them,
and `after_optimizer_step` stores them and writes the projection back. The optimizer state is that of the dense
weights. The dense weights are saved with every checkpoint (`sparsity_state.safetensors`), so a resumed run
continues exactly; they cost one extra copy of the targeted weights.

Under fp16 with a GradScaler the decay is added to the scaled gradient (as in the reference code): prefer bf16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import SparsityConfig
from ..masks import MaskSet
from ..nm import nm_mask, split_nm_targets, top_n_per_group
from ..targets import input_dims
from .base import BatchSource, SparsityMethod, register_method

logger = logging.getLogger(__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class NMConfig(SparsityConfig):
    """`SparsityConfig` of `method="nm"`; `SparsityConfig(method="nm", ...)` builds it.

    Args:
        pattern: "N:M" ("2:4" by default; "4:8", "1:4", ...). Groups run along the reduction dimension
            (`hf_tickets.nm`); a layer whose reduction size M does not divide stays dense with a logged reason,
            or is an error if `target_modules` names it.
        update_interval: None: the mask is chosen once and fixed (ASP). k: dense weights are trained and the mask
            is recomputed from them every k optimizer steps (the model holds their N:M projection).
        sr_decay: lambda_W of SR-STE, the decay on pruned weights (needs `update_interval`).
        base_masks: a masks file or folder (e.g. an IMP ticket's) to compose with: N:M is chosen among the weights
            those masks keep, so the result holds both (a group with fewer than N survivors keeps just those).
    """

    method: str = field(default="nm", metadata={"help": "nm: N:M magnitude masks (ASP, or periodic recomputation)."})
    pattern: str = field(default="2:4", metadata={"help": 'N:M pattern, e.g. "2:4" (N kept in every M).'})
    update_interval: Optional[int] = field(
        default=None,
        metadata={"help": "nm: None = fixed one-shot mask (ASP); k = recompute from dense weights every k steps."},
    )
    sr_decay: float = field(
        default=0.0, metadata={"help": "nm/sr_ste: decay lambda_W on pruned weights (SR-STE), >= 0."}
    )
    base_masks: Optional[str] = field(
        default=None,
        metadata={"help": "nm/sr_ste: masks (file, folder or Hub id) to compose with, e.g. an IMP ticket's."},
    )

    sparsity_required = False

    def validate_method(self) -> None:
        if self.pattern == "unstructured" or self.nm is None:
            raise ValueError(
                f"SparsityConfig.pattern={self.pattern!r} is not N:M: method={self.method!r} needs a pattern such as "
                "'2:4' (for unstructured masks use method='magnitude')."
            )
        if self.layer_rates:
            raise ValueError(
                f"SparsityConfig.layer_rates cannot hold with pattern={self.pattern!r}: N:M fixes every layer's "
                "sparsity at 1 - N/M. Keep a layer dense with exclude_modules instead."
            )
        if self.update_interval is not None and (not _is_int(self.update_interval) or self.update_interval < 1):
            raise ValueError(
                f"SparsityConfig.update_interval={self.update_interval!r} must be None (fixed mask) or an integer "
                "number of optimizer steps >= 1."
            )
        decay = self.sr_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"SparsityConfig.sr_decay={decay!r} must be a number >= 0, e.g. 2e-4.")
        self.sr_decay = float(decay)
        if self.sr_decay > 0 and self.update_interval is None:
            raise ValueError(
                "SparsityConfig.sr_decay acts on pruned weights that keep training, but update_interval=None fixes "
                "the mask and holds pruned weights at 0: set update_interval (or use method='sr_ste')."
            )
        if self.base_masks is not None and not isinstance(self.base_masks, str):
            raise ValueError(f"SparsityConfig.base_masks must be a path or Hub id, got {self.base_masks!r}.")


@dataclass
class SRSTEConfig(NMConfig):
    """`SparsityConfig` of `method="sr_ste"`: `NMConfig` with the mask recomputed every step and lambda_W = 2e-4
    (Zhou et al. 2021's defaults)."""

    method: str = field(default="sr_ste", metadata={"help": "sr_ste: SR-STE N:M training (Zhou et al. 2021)."})
    update_interval: Optional[int] = field(
        default=1, metadata={"help": "sr_ste: optimizer steps between mask recomputations (1 in the paper)."}
    )
    sr_decay: float = field(default=2e-4, metadata={"help": "sr_ste: lambda_W, decay on pruned weights."})

    def validate_method(self) -> None:
        if self.update_interval is None:
            raise ValueError(
                "method='sr_ste' trains dense weights and recomputes the mask: update_interval must be >= 1 (for a "
                "fixed one-shot mask use method='nm')."
            )
        super().validate_method()


class NMSparsity(SparsityMethod):
    """N:M masks by magnitude: fixed (ASP) or recomputed from dense weights (periodic, SR-STE)."""

    def __init__(self, config: SparsityConfig) -> None:
        super().__init__(config)
        self.keeps_dense_weights = config.update_interval is not None
        self._dense: Optional[dict[str, torch.Tensor]] = None  # the trained dense weights (dense mode)
        self._masks: Optional[dict[str, torch.Tensor]] = None  # current N:M masks on the weights' devices
        self._base: Optional[dict[str, torch.Tensor]] = None
        self._dims: dict[str, int] = {}
        self._flips: Optional[torch.Tensor] = None  # mask entries changed since the last log (device scalar)
        self._flip_updates = 0
        self._swapped = False  # dense weights are in the model (between on_dense_grads and the projection)
        self._flats: list[_Flat] = []
        self._max_steps = 0

    # ---- masks ---------------------------------------------------------------------------------------------

    def initial_masks(self, model: nn.Module, targets: dict[str, nn.Parameter], batches: BatchSource) -> MaskSet:
        cfg = self.config
        targets, _ = split_nm_targets(model, targets, cfg.nm, explicit=cfg.target_modules is not None)
        self._dims = input_dims(model, targets)
        self._base = self._load_base(targets)
        masks = {name: self._select(p.detach(), name) for name, p in targets.items()}
        if self.keeps_dense_weights:
            self._dense = {name: p.detach().clone() for name, p in targets.items()}
            self._masks = {name: m.clone() for name, m in masks.items()}
            with torch.no_grad():  # from now on the model holds the projection (evaluate / save before train too)
                for name, p in targets.items():
                    p.masked_fill_(~masks[name], 0)
        return MaskSet(
            masks,
            self.mask_metadata(
                nm_dims=self._dims,
                update_interval=cfg.update_interval,
                sr_decay=cfg.sr_decay,
                base_masks=cfg.base_masks,
            ),
        )

    def _select(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        n, m = self.config.nm
        allowed = None if self._base is None else self._base[name]
        return nm_mask(weight.abs(), n, m, self._dims[name], allowed=allowed)

    def _load_base(self, targets: dict[str, nn.Parameter]) -> Optional[dict[str, torch.Tensor]]:
        cfg = self.config
        if cfg.base_masks is None:
            return None
        from ..masks import load_masks

        base = load_masks(cfg.base_masks)
        missing = [n for n in targets if n not in base]
        if missing:
            raise ValueError(
                f"SparsityConfig.base_masks={cfg.base_masks!r} has no mask for {missing[:3]}: N:M after IMP needs "
                "the masks of the same targets (use the same target_modules / exclude_modules as the IMP run)."
            )
        wrong = [n for n in targets if tuple(base[n].shape) != tuple(targets[n].shape)]
        if wrong:
            raise ValueError(
                f"SparsityConfig.base_masks={cfg.base_masks!r} does not fit the model: {wrong[0]!r} has shape "
                f"{tuple(base[wrong[0]].shape)}, the weight {tuple(targets[wrong[0]].shape)}."
            )
        return {n: base[n].to(targets[n].device) for n in targets}

    # ---- dense mode (periodic recomputation, SR-STE) --------------------------------------------------------

    def on_train_begin(self, model: nn.Module, masks: MaskSet, max_steps: int) -> None:
        self._max_steps = int(max_steps or 0)
        if not self.keeps_dense_weights:
            return
        params = dict(model.named_parameters())
        if self._dense is None or set(self._dense) != set(masks):
            # masks given without the dense weights (e.g. a folder's): start from the model's weights as they are
            logger.warning(
                "method=%r has no dense weights for these masks: training starts from the model's current weights.",
                self.config.method,
            )
            self._dense = {n: params[n].detach().clone() for n in masks}
        if not self._dims or set(self._dims) != set(masks):
            self._dims = input_dims(model, {n: params[n] for n in masks})
        # one flat buffer per (device, dtype): dense weights, masks and allowed entries, each tensor laid out with
        # its reduction dim last, so that every M consecutive entries of a buffer are one group of one tensor and
        # a whole step is a handful of kernels, not a handful per tensor
        self._flats = []
        keys: dict[tuple, list[str]] = {}
        for name in masks:
            keys.setdefault((params[name].device, params[name].dtype), []).append(name)
        dense_views, mask_views = {}, {}
        for names in keys.values():
            flat = _Flat(names, [params[n] for n in names], [self._dims[n] for n in names], self.config.nm[1])
            for name, view in zip(names, flat.dense_views):
                view.copy_(self._dense[name].to(view.device, view.dtype))
                dense_views[name] = view
            for name, view in zip(names, flat.mask_views):  # the callback's masks (restored on resume) are current
                view.copy_(masks[name].to(view.device, torch.bool))
                mask_views[name] = view
            if self._base is not None:
                flat.set_allowed([self._base[n] for n in names])
            self._flats.append(flat)
        self._dense, self._masks = dense_views, mask_views
        self._project(params)

    @torch.no_grad()
    def _project(self, params: dict[str, nn.Parameter]) -> None:
        """The model's weights := the N:M projection of the dense weights under the current masks."""
        for flat in self._flats:
            torch._foreach_copy_([params[n] for n in flat.names], flat.projection_views())
        self._swapped = False

    @torch.no_grad()
    def on_dense_grads(self, model: nn.Module, masks: MaskSet, step: int) -> None:
        if not self.keeps_dense_weights:
            return
        params = dict(model.named_parameters())
        decay = self.config.sr_decay
        for flat in self._flats:
            targets = [params[n] for n in flat.names]
            if decay:  # SR-STE: g + lambda_W * (not mask) * w, on the dense weights
                pruned = flat.pruned_views()
                have = [i for i, p in enumerate(targets) if p.grad is not None]
                if have:
                    torch._foreach_add_([targets[i].grad for i in have], [pruned[i] for i in have], alpha=decay)
            torch._foreach_copy_(targets, flat.dense_views)  # the optimizer steps the dense weights
        self._swapped = True

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, masks: MaskSet, step: int) -> Optional[MaskSet]:
        if not self.keeps_dense_weights:
            return None
        params = dict(model.named_parameters())
        if self._swapped:
            for flat in self._flats:
                torch._foreach_copy_(flat.dense_views, [params[n] for n in flat.names])
        if step % self.config.update_interval == 0:
            n = self.config.nm[0]
            for flat in self._flats:
                flips = flat.recompute(n)
                self._flips = flips if self._flips is None else self._flips + flips
            self._flip_updates += 1
        self._project(params)
        if step >= self._max_steps > 0:
            self._sync(masks)
        return None

    def _sync(self, masks: MaskSet) -> None:
        """Write the current masks into the callback's `MaskSet` (what is saved and what `trainer.masks` shows)."""
        if self._masks is None:
            return
        for name, mask in self._masks.items():
            masks[name].copy_(mask.to(masks[name].device))

    def before_save(self, model: nn.Module, masks: MaskSet) -> None:
        if self.keeps_dense_weights and self._masks is not None:
            if self._swapped:  # a save between the swap and the projection: save the projection
                self._project(dict(model.named_parameters()))
            self._sync(masks)
        super().before_save(model, masks)

    def log_metrics(self) -> dict[str, float]:
        """`nm/flip_rate`: fraction of mask entries changed per recomputation since the last log (SR-STE's
        measure of how far the mask has settled)."""
        if self._flips is None or not self._flip_updates or not self._masks:
            return {}
        total = sum(m.numel() for m in self._masks.values())
        rate = float(self._flips) / (total * self._flip_updates)
        self._flips, self._flip_updates = None, 0
        return {"nm/flip_rate": round(rate, 8)}

    # ---- checkpoint state ----------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.keeps_dense_weights or self._dense is None:
            return {}
        return {f"dense::{name}": t for name, t in self._dense.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        dense = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("dense::")}
        if dense:
            self._dense = {k: v.clone() for k, v in dense.items()}


class _Flat:
    """Targets of one device and dtype in one buffer, each laid out with its reduction dim last (a Conv2d weight as
    [out, kh, kw, in]), so that the buffer viewed as [-1, M] is every group of every tensor. `dense_views` and
    `mask_views` are parameter-shaped views into the buffers."""

    def __init__(self, names: list[str], params: list[torch.Tensor], dims: list[int], m: int) -> None:
        self.names, self.m = names, m
        ref = params[0]
        total = sum(p.numel() for p in params)
        self.dense = torch.empty(total, dtype=ref.dtype, device=ref.device)
        self.mask = torch.zeros(total, dtype=torch.bool, device=ref.device)
        self.allowed: Optional[torch.Tensor] = None
        self._layout = []  # (offset, moved shape, dim) per tensor
        offset = 0
        for p, dim in zip(params, dims):
            self._layout.append((offset, p.movedim(dim, -1).shape, dim))
            offset += p.numel()
        self.dense_views = self.views(self.dense)
        self.mask_views = self.views(self.mask)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Parameter-shaped views of a buffer laid out like `dense`."""
        out = []
        for offset, moved, dim in self._layout:
            numel = moved.numel()
            out.append(flat[offset : offset + numel].view(moved).movedim(-1, dim))
        return out

    def set_allowed(self, allowed: list[torch.Tensor]) -> None:
        self.allowed = torch.zeros_like(self.mask)
        for view, keep in zip(self.views(self.allowed), allowed):
            view.copy_(keep.to(view.device, torch.bool))

    def projection_views(self) -> list[torch.Tensor]:
        return self.views(self.dense.masked_fill(~self.mask, 0))

    def pruned_views(self) -> list[torch.Tensor]:
        return self.views(self.dense.masked_fill(self.mask, 0))

    def recompute(self, n: int) -> torch.Tensor:
        """Keep the n largest |w| of every group (among allowed entries); returns how many mask entries changed."""
        groups = self.dense.view(-1, self.m).abs().float()
        if self.allowed is not None:
            groups.masked_fill_(~self.allowed.view(-1, self.m), float("-inf"))
        new = top_n_per_group(groups, n)
        if self.allowed is not None:
            new &= self.allowed.view(-1, self.m)
        old = self.mask.view(-1, self.m)
        flips = (new != old).sum()
        old.copy_(new)
        return flips


class SRSTE(NMSparsity):
    """SR-STE: `NMSparsity` with `SRSTEConfig`'s defaults (mask recomputed every step, lambda_W = 2e-4)."""


register_method("nm", NMConfig, NMSparsity)
register_method("sr_ste", SRSTEConfig, SRSTE)
