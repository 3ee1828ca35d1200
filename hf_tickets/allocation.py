"""Scores -> boolean masks: global or layerwise thresholds with exact counts, per-layer rates, N:M groups."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .targets import module_matches, module_name_of, rate_factor


def _pools(names: list[str], scope: str, layer_rates: Optional[dict]) -> list[tuple[list[str], float]]:
    """Group tensors that share one threshold, each with its rate factor.

    Tensors matching `layer_rates` form a pool of their own (pruned at base rate * factor); in "layerwise" scope
    every tensor is a pool; in "global" scope the rest share one pool.
    """
    pools: list[tuple[list[str], float]] = []
    shared: list[str] = []
    for name in names:
        factor = rate_factor(name, layer_rates)
        if factor is not None:
            pools.append(([name], factor))
        elif scope == "layerwise":
            pools.append(([name], 1.0))
        else:
            shared.append(name)
    if shared:
        pools.insert(0, (shared, 1.0))
    return pools


def check_layer_rates(names: list[str], layer_rates: Optional[dict]) -> None:
    """Every layer_rates key must match at least one targeted tensor, or the user's intent is silently lost."""
    for pattern in layer_rates or {}:
        modules = [module_name_of(n) for n in names]
        if not any(module_matches(m, pattern) or module_matches(m, [pattern]) for m in modules):
            raise ValueError(
                f"SparsityConfig.layer_rates key {pattern!r} matches no targeted module: use one of "
                f"{modules[:4]}{' ...' if len(modules) > 4 else ''} (regex full match or name suffix)."
            )


def _keep_top(scores: list[torch.Tensor], n_keep: int) -> list[torch.Tensor]:
    """Masks keeping exactly the `n_keep` highest scores across `scores` (ties broken by position)."""
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_keep > 0:
        keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    rate: float,
    *,
    scope: str = "global",
    layer_rates: Optional[dict] = None,
    current: Optional[Mapping[str, torch.Tensor]] = None,
    relative: bool = False,
) -> dict[str, torch.Tensor]:
    """Turn scores into boolean masks with exact counts.

    Args:
        scores: name -> score tensor (higher is kept).
        rate: fraction to prune. With `relative=False` it is the final sparsity of each pool; with
            `relative=True` it is the fraction of the *still alive* weights to prune now (IMP's per-level rate).
        scope: "global" (one threshold over all tensors) or "layerwise" (one per tensor).
        layer_rates: module regex -> factor on `rate` for layers pruned on their own.
        current: existing masks; entries already pruned stay pruned, so new masks are subsets of them.
    """
    names = list(scores)
    check_layer_rates(names, layer_rates)
    adjusted = {}
    for name in names:
        s = scores[name].detach().float()
        if current is not None:
            s = s.masked_fill(~current[name].to(s.device), float("-inf"))
        adjusted[name] = s
    masks: dict[str, torch.Tensor] = {}
    for pool, factor in _pools(names, scope, layer_rates):
        pool_rate = rate * factor
        numel = sum(adjusted[n].numel() for n in pool)
        alive = numel if current is None else sum(int(current[n].sum()) for n in pool)
        if relative:
            n_keep = alive - int(round(pool_rate * alive))
        else:
            n_keep = min(alive, numel - int(round(pool_rate * numel)))
        for name, mask in zip(pool, _keep_top([adjusted[n] for n in pool], n_keep)):
            masks[name] = mask.to(scores[name].device)
    return {n: masks[n] for n in names}


def nm_masks(
    scores: Mapping[str, torch.Tensor], n: int, m: int, input_dims: Optional[Mapping[str, int]] = None
) -> dict[str, torch.Tensor]:
    """Keep the `n` highest scores in every group of `m` consecutive input features.

    Groups run along the reduction dimension that sparse tensor cores use: the input features of a Linear weight
    [out, in], and the input channels of a Conv weight [out, in, *kernel] (grouped at each kernel position).
    `input_dims` names another input dimension per tensor (0 for transformers' Conv1D, stored as [in, out]).
    """
    masks = {}
    for name, score in scores.items():
        if score.dim() < 2:
            raise ValueError(f"N:M pattern needs a weight with >= 2 dims; {name!r} has shape {tuple(score.shape)}.")
        dim = (input_dims or {}).get(name, 1)
        # input-last view ([out, *kernel, in] for convs) so that groups are consecutive input features
        s = score.detach().float().movedim(dim, -1)
        if s.shape[-1] % m:
            raise ValueError(
                f"SparsityConfig.pattern='{n}:{m}' needs the input dimension of {name!r} (size {s.shape[-1]}) to be "
                f"divisible by {m}: exclude this module with exclude_modules or choose another pattern."
            )
        groups = s.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
        keep = keep.view(s.shape)
        masks[name] = keep.movedim(-1, dim).contiguous()
    return masks


def random_masks_like(reference: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random masks keeping exactly as many entries per tensor as `reference` (the LTH random-pruning control).

    A CPU generator seeded with `seed` draws the positions, so every rank and device gets the same masks.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, ref in reference.items():
        scores = torch.rand(ref.shape, generator=generator)
        out[name] = _keep_top([scores], int(ref.sum()))[0].to(ref.device)
    return out
