"""N:M sparsity: which dimension the groups run along, N:M masks and projections, and the validator.

Layout (what a 2:4 sparse tensor core consumes). cuSPARSELt multiplies a compressed sparse operand A [rows, K]
by a dense one, and the 2:4 constraint holds on every 4 *consecutive* entries of a row of A along the reduction
dimension K (the values are stored compressed, with 2-bit indices per kept entry, per group of 4 along K). So
the groups of M weights must be M consecutive entries of the reduction dimension in the order the GEMM reads it:

* `nn.Linear` weight [out, in]: y = x W^T, K = in. Groups: M consecutive input features of one output row.
* transformers `Conv1D` weight [in, out] (GPT-2; y = x W): K = in is dim 0. Groups run down dim 0.
* `nn.Conv2d` weight [out, in/groups, kh, kw]: an implicit-GEMM convolution (cuDNN / CUTLASS on tensor cores)
  runs in channels-last (NHWC) layout, where the GEMM's K = kh * kw * (in/groups) is read as (r, s, c) with the
  input channel c fastest: the weight as a GEMM operand is [out, kh, kw, in]. Groups are therefore M consecutive
  *input channels at one kernel position* (r, s), i.e. along dim 1 of the PyTorch weight. This is also NVIDIA
  ASP's layout for convolutions and needs in/groups to be divisible by M, so a group never straddles two kernel
  positions. (Grouping the NCHW flattening [out, in*kh*kw] instead would put a kernel row's kw taps in one group:
  a layout no sparse tensor-core convolution reads.) Conv1d/Conv3d follow the same rule.

`reduction_dim` returns that dimension; `group_view` reshapes a tensor so that each row is one group.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .config import parse_nm_pattern
from .targets import Conv1D, module_name_of

logger = logging.getLogger(__name__)

PatternLike = Union[str, tuple[int, int]]


def as_nm(pattern: PatternLike) -> tuple[int, int]:
    """(N, M) from "N:M" or a tuple; ValueError for "unstructured" or a malformed pattern."""
    if isinstance(pattern, tuple):
        n, m = pattern
        parsed = parse_nm_pattern(f"{n}:{m}")
    else:
        parsed = parse_nm_pattern(str(pattern))
    if parsed is None:
        raise ValueError(f"pattern={pattern!r} is not an N:M pattern: give one such as '2:4'.")
    return parsed


def reduction_dim(module: nn.Module) -> Optional[int]:
    """The dimension of `module.weight` that the layer's GEMM reduces over, or None for a layer that is not a
    GEMM N:M hardware runs (embeddings, norms, transposed convolutions)."""
    if isinstance(Conv1D, type) and isinstance(module, Conv1D):
        return 0
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return 1
    return None


def group_view(tensor: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """`tensor` as [groups, m]: each row is m consecutive entries along `dim` (the other dims in their order, so a
    Conv2d weight [out, in, kh, kw] is read as [out, kh, kw, in], the channels-last GEMM operand)."""
    moved = tensor.movedim(dim, -1)
    if moved.shape[-1] % m:
        raise ValueError(f"dimension {dim} of size {moved.shape[-1]} is not divisible by M={m}")
    return moved.reshape(-1, m)


def _from_group_view(groups: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    moved_shape = like.movedim(dim, -1).shape
    return groups.reshape(moved_shape).movedim(-1, dim).contiguous()


def top_n_per_group(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the n largest entries of every row of `groups` [G, m]; of equal entries, the lower index wins.

    An entry is kept when fewer than n entries of its row beat it, counted with m * (m - 1) comparisons of whole
    columns. This replaces `torch.topk` + `scatter_`, which picked among ties arbitrarily and was SR-STE's main
    per-step cost: over BERT-base's 21M groups of 4 on an H200, topk took 26.3 ms where this rule, computed as one
    [G, m, m] comparison, took 5.7 ms for the same masks (benchmarks/sr_ste_parts.py, docs/nm.md); this column form
    needs no [G, m, m] buffer and took 0.98 s against topk's 1.30 s on one CPU core for the same groups.
    """
    m = groups.shape[1]
    cols = groups.t().contiguous()  # [m, G]: each comparison reads two contiguous columns
    keep = torch.empty_like(cols, dtype=torch.bool)
    for i in range(m):
        beaten = torch.zeros(cols.shape[1], dtype=torch.int8, device=cols.device)
        for j in range(m):
            if j != i:
                beaten += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
        torch.lt(beaten, n, out=keep[i])
    return keep.t()


def nm_mask(score: torch.Tensor, n: int, m: int, dim: int, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep the `n` highest scores of every group of `m` along `dim` (ties: the lower index). With `allowed`
    (a bool mask, e.g. an IMP ticket's), only allowed entries can be kept: a group with fewer than `n` allowed
    entries keeps just those, which still holds the pattern (at most `n` nonzeros per group)."""
    s = score.detach().float()
    if allowed is not None:
        s = s.masked_fill(~allowed.to(s.device, torch.bool), float("-inf"))
    groups = group_view(s, dim, m)
    keep = top_n_per_group(groups, n)
    if allowed is not None:
        keep &= torch.isfinite(groups)
    return _from_group_view(keep, s, dim)


def nm_violations(tensor: torch.Tensor, n: int, m: int, dim: int) -> int:
    """Groups of `tensor` along `dim` with more than `n` nonzero (or, for a bool mask, kept) entries."""
    groups = group_view(tensor.detach(), dim, m)
    nonzero = groups if groups.dtype == torch.bool else groups != 0
    return int((nonzero.sum(dim=1) > n).sum())


# ---- which targets can hold the pattern -----------------------------------------------------------------------


def nm_dims(model: nn.Module, names) -> dict[str, Optional[int]]:
    """Reduction dim of every named weight (None: not a GEMM weight)."""
    return {name: reduction_dim(model.get_submodule(module_name_of(name))) for name in names}


def split_nm_targets(
    model: nn.Module, targets: Mapping[str, nn.Parameter], pattern: PatternLike, explicit: bool
) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """Targets that can hold the pattern, and the others with the reason.

    A layer whose reduction size is not divisible by M (e.g. an RGB stem convolution, 3 input channels), or that
    is no GEMM weight, cannot hold N:M. When the targets were chosen by default it stays dense and the reason is
    logged; when the user named the modules (`explicit`: `target_modules` was given), that is a ValueError naming
    the layers, before any training.
    """
    n, m = as_nm(pattern)
    dims = nm_dims(model, targets)
    kept: dict[str, nn.Parameter] = {}
    skipped: dict[str, str] = {}
    for name, param in targets.items():
        dim = dims[name]
        if dim is None or param.dim() < 2:
            skipped[name] = f"{type(model.get_submodule(module_name_of(name))).__name__} is not a GEMM weight"
        elif param.shape[dim] % m:
            skipped[name] = f"its reduction size {param.shape[dim]} (dim {dim}) is not divisible by M={m}"
        else:
            kept[name] = param
    if skipped and explicit:
        listed = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        raise ValueError(
            f"SparsityConfig.pattern='{n}:{m}' cannot hold on modules named in target_modules ({listed}): drop them "
            "from target_modules, or choose an M that divides their reduction size."
        )
    for name, why in skipped.items():
        logger.warning("N:M %d:%d: %s stays dense: %s.", n, m, name, why)
    return kept, skipped


# ---- the validator ------------------------------------------------------------------------------------------


@dataclass
class NMReport:
    """Per-tensor result of `validate_nm`. `ok` is True when every checked tensor holds the pattern."""

    pattern: str
    source: str  # "masks" or "zeros"
    tensors: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.tensors) and all(row["ok"] for row in self.tensors.values())

    def bad(self) -> dict[str, dict]:
        return {name: row for name, row in self.tensors.items() if not row["ok"]}

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "source": self.source,
            "ok": self.ok,
            "tensors": self.tensors,
            "skipped": self.skipped,
        }

    def raise_if_invalid(self, what: str = "model") -> None:
        if not self.tensors:
            raise ValueError(f"{what} has no tensor to check against pattern {self.pattern!r}.")
        bad = self.bad()
        if bad:
            listed = "; ".join(f"{n}: {_why(r)}" for n, r in list(bad.items())[:5])
            raise ValueError(
                f"{what} does not hold {self.pattern} ({len(bad)} of {len(self.tensors)} tensors fail): {listed}. "
                "The weights were changed after the masks were made (or the masks are not N:M): re-apply the masks "
                "or re-run the N:M method."
            )

    def summary(self) -> str:
        ok = sum(r["ok"] for r in self.tensors.values())
        return f"{self.pattern} from {self.source}: {ok} of {len(self.tensors)} tensors hold the pattern"


def _why(row: dict) -> str:
    parts = []
    if row.get("bad_groups"):
        parts.append(f"{row['bad_groups']} of {row['groups']} groups have more than N nonzeros")
    if row.get("bad_mask_groups"):
        parts.append(f"{row['bad_mask_groups']} mask groups keep more than N")
    if row.get("nonzero_pruned"):
        parts.append(f"{row['nonzero_pruned']} pruned weights are nonzero")
    return ", ".join(parts) or "fails"


def check_tensors(
    weights: Mapping[str, torch.Tensor],
    dims: Mapping[str, Optional[int]],
    pattern: PatternLike,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
) -> NMReport:
    """The validator's core, on plain tensors: every weight named in `dims` (or in `masks`) is checked.

    From masks: every mask group keeps at most N entries and every pruned weight is exactly zero. From zeros
    alone: every group of the weight has at most N nonzeros (what the hardware needs).
    """
    n, m = as_nm(pattern)
    report = NMReport(pattern=f"{n}:{m}", source="masks" if masks is not None else "zeros")
    names = list(masks) if masks is not None else list(dims)
    for name in names:
        if name not in weights:
            report.tensors[name] = {"shape": None, "ok": False, "error": "no such weight"}
            continue
        w = weights[name]
        dim = dims.get(name)
        if dim is None or w.dim() < 2:
            report.skipped[name] = "not a GEMM weight"
            continue
        if w.shape[dim] % m:
            if masks is not None:
                report.tensors[name] = {
                    "shape": list(w.shape),
                    "dim": dim,
                    "ok": False,
                    "error": f"reduction size {w.shape[dim]} not divisible by {m}",
                }
            else:
                report.skipped[name] = f"reduction size {w.shape[dim]} not divisible by {m}"
            continue
        groups = w.numel() // m
        row = {"shape": list(w.shape), "dim": dim, "groups": groups, "bad_groups": nm_violations(w, n, m, dim)}
        if masks is not None:
            keep = masks[name].to(w.device, torch.bool)
            if keep.shape != w.shape:
                row.update(ok=False, error=f"mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
                report.tensors[name] = row
                continue
            row["bad_mask_groups"] = nm_violations(keep, n, m, dim)
            row["nonzero_pruned"] = int((w.detach()[~keep] != 0).sum())
        row["ok"] = not (row["bad_groups"] or row.get("bad_mask_groups") or row.get("nonzero_pruned"))
        report.tensors[name] = row
    return report


def validate_nm(
    model_or_folder: Union[nn.Module, str, os.PathLike],
    pattern: PatternLike = "2:4",
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    from_zeros: bool = False,
    strict: bool = False,
) -> NMReport:
    """Check that every group of every N:M tensor of a model or a saved folder holds the pattern.

    Args:
        model_or_folder: a model, or a folder written by `save_pretrained` / `TicketTrainer.save_model`.
        pattern: "N:M", e.g. "2:4".
        masks: the masks to check against. Default: the model's attached masks (`apply_sparsity`) or the folder's
            masks.safetensors. With masks, each mask group keeps at most N and every pruned weight is zero.
        from_zeros: ignore masks and check the zeros alone: every group of every Linear/Conv1D/Conv weight whose
            reduction size M divides has at most N nonzeros (what cuSPARSELt needs). Layers left dense show as
            failing: the report is per tensor.
        strict: raise a ValueError naming the failing tensors instead of returning a failing report.
    """
    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
        if masks is None and not from_zeros:
            masks = getattr(model, "hf_tickets_masks", None)
        params = dict(model.named_parameters())
        if masks is not None and not from_zeros:
            dims = nm_dims(model, [n for n in masks if n in params])
            weights = params
        else:
            masks = None
            candidates = [n for n, p in params.items() if n.endswith("weight") and p.dim() >= 2]
            dims = {k: v for k, v in nm_dims(model, candidates).items() if v is not None}
            weights = params
        what = type(model).__name__
    else:
        folder = str(model_or_folder)
        weights, model_dims = _load_folder_weights(folder)
        folder_masks, dims_meta = _load_folder_masks(folder)
        if masks is None and not from_zeros:
            masks = folder_masks
        if from_zeros:
            masks = None
        dims = _folder_dims(weights, dims_meta, model_dims)
        what = folder
    report = check_tensors(weights, dims, pattern, masks)
    if strict:
        report.raise_if_invalid(what)
    return report


def _load_folder_weights(folder: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Optional[int]]]]:
    """The folder's weights under the model's parameter names (masks are keyed by `named_parameters()` names, which
    transformers may store under other keys), and each weight's reduction dim.

    With a config.json, the model class it names is loaded with `from_pretrained` (so GPT-2's Conv1D is told apart
    from Linear, and renamed keys are mapped back); otherwise the raw safetensors keys are used, dims unknown."""
    from .files import MASKS_NAME, MODEL_CONFIG_NAME, STATE_TENSORS_NAME

    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder: pass a model or a folder written by save_pretrained.")
    if os.path.isfile(os.path.join(folder, MODEL_CONFIG_NAME)):
        try:
            model = _model_from_folder(folder)
        except Exception as err:  # an architecture transformers cannot build here: read the files as they are
            logger.info("could not load %s with from_pretrained (%s): reading its safetensors keys", folder, err)
        else:
            params = {n: p.detach() for n, p in model.named_parameters()}
            return params, nm_dims(model, list(params))
    from safetensors.torch import load_file

    files = [
        f
        for f in sorted(os.listdir(folder))
        if f.endswith(".safetensors")
        and f not in (MASKS_NAME, STATE_TENSORS_NAME)
        and not f.startswith(("optimizer", "scheduler", "adapter"))
    ]
    if not files:
        raise ValueError(f"{folder!r} has no model *.safetensors file to check.")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(os.path.join(folder, f)))
    return weights, None


def _load_folder_masks(folder: str) -> tuple[Optional[dict[str, torch.Tensor]], dict[str, int]]:
    from .masks import MASKS_NAME, MaskSet

    if not os.path.isfile(os.path.join(folder, MASKS_NAME)):
        return None, {}
    masks = MaskSet.load(folder)
    dims = masks.metadata.get("nm_dims") or {}
    if isinstance(dims, str):
        dims = json.loads(dims)
    return dict(masks), {k: int(v) for k, v in dims.items()}


def _folder_dims(
    weights: Mapping[str, torch.Tensor], known: Mapping[str, int], model_dims: Optional[Mapping[str, Optional[int]]]
) -> dict[str, int]:
    """Reduction dims for a saved folder: from the masks' metadata, else from the loaded model's layer types, else
    dim 1 of every >= 2-D weight (the [out, in, ...] layout)."""
    out = {}
    for name, w in weights.items():
        if name in known:
            out[name] = known[name]
        elif model_dims is not None:
            if model_dims.get(name) is not None:
                out[name] = model_dims[name]
        elif name.endswith("weight") and w.dim() >= 2:
            out[name] = 1
    return out


def _model_from_folder(folder: str) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from . import models  # noqa: F401  (registers the reference CNNs with the Auto classes)

    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None:
        return cls.from_pretrained(folder)
    try:
        return AutoModelForImageClassification.from_pretrained(folder)
    except ValueError:
        return AutoModel.from_pretrained(folder)
