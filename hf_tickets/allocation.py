"""Scores -> boolean masks: global or layerwise thresholds with exact counts, per-layer rates, N:M groups."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from .nm import nm_mask
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


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the float32 order of `values` (the IEEE-754 bit trick; NaN above +inf, as in
    `torch.topk`). Integer keys make "equal to the threshold" exact, which the tie-break below needs."""
    bits = values.detach().float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _keep_top(scores: list[torch.Tensor], n_keep: int) -> list[torch.Tensor]:
    """Masks keeping exactly the `n_keep` highest scores across `scores`; among scores equal to the lowest one kept,
    the first in flat order (the tensors concatenated, each row-major) are kept.

    The tie-break is by position so that it can be reproduced without the scores in one place: FSDP2 shards score
    their own rows and count ties with a collective (`hf_tickets.sharded`). `topk` alone breaks ties arbitrarily.
    """
    keep = keep_top_flat(torch.cat([s.reshape(-1).float().cpu() for s in scores]), n_keep)
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def keep_top_flat(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """`_keep_top` of one flat score tensor, computed on its own device (RigL ranks every layer at each update)."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_keep > 0:
        keys = order_keys(flat)
        threshold = torch.topk(keys, n_keep, sorted=False).values.min()
        above, tied = keys > threshold, keys == threshold
        need = n_keep - int(above.sum())
        keep = above | (tied & (torch.cumsum(tied, 0) <= need))
    return keep


def pool_keep_count(numel: int, alive: int, rate: float, relative: bool) -> int:
    """Entries a pool of `numel` entries (`alive` of them still kept) keeps after pruning at `rate`."""
    if relative:
        return alive - int(round(rate * alive))
    return min(alive, numel - int(round(rate * numel)))


def capped_counts(numels: list[int], alives: list[int], n_keep: int, cap: float, pool: list[str]) -> list[int]:
    """How many entries each tensor of a pool keeps first under `max_layer_sparsity=cap` (see `_keep_top_capped`);
    raises when the pool's count is below what the cap forces."""
    forced_counts = [min(min_kept(numel, cap), alive) for numel, alive in zip(numels, alives)]
    if len(pool) == 1:  # a pool of one tensor was checked against the cap by the config; only rounding differs
        forced_counts[0] = min(forced_counts[0], n_keep)
    if sum(forced_counts) > n_keep:
        raise ValueError(
            f"max_layer_sparsity={cap} cannot hold: the {len(pool)} tensors pruned together ({pool[:3]}"
            f"{' ...' if len(pool) > 3 else ''}) must keep {sum(forced_counts)} weights under the cap, but the target "
            f"keeps {n_keep}. Lower SparsityConfig.sparsity or raise max_layer_sparsity."
        )
    return forced_counts


def masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    rate: float,
    *,
    scope: str = "global",
    layer_rates: Optional[dict] = None,
    current: Optional[Mapping[str, torch.Tensor]] = None,
    relative: bool = False,
    max_layer_sparsity: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Turn scores into boolean masks with exact counts.

    Args:
        scores: name -> score tensor (higher is kept).
        rate: fraction to prune. With `relative=False` it is the final sparsity of each pool; with
            `relative=True` it is the fraction of the *still alive* weights to prune now (IMP's per-level rate).
        scope: "global" (one threshold over all tensors) or "layerwise" (one per tensor).
        layer_rates: module regex -> factor on `rate` for layers pruned on their own.
        current: existing masks; entries already pruned stay pruned, so new masks are subsets of them.
        max_layer_sparsity: no tensor ends sparser than this (`SparsityConfig.max_layer_sparsity`): in a pool of
            several tensors, each keeps at least its own highest-scoring `ceil((1 - cap) * numel)` entries (or all
            it has alive) and the rest of the pool's budget goes to the highest scores left, so the pool's count
            stays exact. Raises ValueError when the pool's count is below what the cap forces.
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
        n_keep = pool_keep_count(numel, alive, pool_rate, relative)
        pool_scores = [adjusted[n] for n in pool]
        if max_layer_sparsity is None:
            kept = _keep_top(pool_scores, n_keep)
        else:
            kept = _keep_top_capped(pool, pool_scores, n_keep, max_layer_sparsity, current)
        for name, mask in zip(pool, kept):
            masks[name] = mask.to(scores[name].device)
    return {n: masks[n] for n in names}


def min_kept(numel: int, max_sparsity: float) -> int:
    """The fewest entries a tensor of `numel` entries keeps with sparsity at most `max_sparsity`."""
    return numel - math.floor(max_sparsity * numel + 1e-9)


def _keep_top_capped(
    pool: list[str],
    scores: list[torch.Tensor],
    n_keep: int,
    cap: float,
    current: Optional[Mapping[str, torch.Tensor]],
) -> list[torch.Tensor]:
    """`_keep_top` with every tensor keeping at least its `min_kept` highest (alive) entries: those are kept
    first, and the rest of the `n_keep` budget goes to the highest scores left anywhere in the pool. The result is
    what one global threshold gives, except that no tensor falls below the cap's count."""
    alives = [s.numel() if current is None else int(current[name].sum()) for name, s in zip(pool, scores)]
    forced_counts = capped_counts([s.numel() for s in scores], alives, n_keep, cap, pool)
    forced = [_keep_top([s], k)[0] for s, k in zip(scores, forced_counts)]
    rest = [s.detach().float().cpu().masked_fill(f, float("-inf")) for s, f in zip(scores, forced)]
    extra = _keep_top(rest, n_keep - sum(forced_counts))
    return [f | e for f, e in zip(forced, extra)]


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
        if score.shape[dim] % m:
            raise ValueError(
                f"SparsityConfig.pattern='{n}:{m}' needs the input dimension of {name!r} (size {score.shape[dim]}) to "
                f"be divisible by {m}: exclude this module with exclude_modules or choose another pattern."
            )
        masks[name] = nm_mask(score, n, m, dim)  # ties: the lower index
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


# ---- density allocation for methods that start from a sparse random mask (RigL, SET, static sparse) --------------

DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _raw_density(shape: Sequence[int], distribution: str) -> float:
    """The un-normalised density of a layer: its share of the budget per weight, before scaling by epsilon."""
    dims = [int(d) for d in shape]
    if distribution == "uniform":
        return 1.0
    if distribution == "erdos_renyi":  # (n_in + n_out) / (n_in * n_out) over the first two dims
        dims = dims[:2]
    # "erk": sum(shape) / prod(shape), kernel dims included (Evci et al. 2020); a 1-D tensor gets 1
    return sum(dims) / math.prod(dims)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    distribution: str,
    dense_layers: Sequence[str] = (),
    max_layer_sparsity: Optional[float] = None,
) -> dict[str, float]:
    """Per-layer densities whose parameter-count-weighted mean is `density`.

    Args:
        shapes: name -> shape of every tensor to sparsify, in order.
        density: overall fraction of entries kept (1 - `SparsityConfig.sparsity`), in [0, 1].
        distribution: `"uniform"` (the same density everywhere), `"erdos_renyi"` (density proportional to
            (n_in + n_out) / (n_in * n_out) over the first two dims) or `"erk"` (proportional to
            sum(shape) / prod(shape), kernel dims included; Evci et al. 2020).
        dense_layers: exact names of tensors kept dense (density 1); the others share the rest of the budget.
        max_layer_sparsity: a floor on every layer's density (`SparsityConfig.max_layer_sparsity`): a layer the
            distribution would make sparser keeps `min_kept(numel, cap)` entries and the others are rescaled.

    A layer whose density would exceed 1 is capped at 1 and the others are rescaled, until no density exceeds 1
    (capping only frees budget for the others, so every layer above 1 is capped at once). The weighted mean is
    exact up to floating point; `counts_from_densities` turns densities into exact integer counts. With a floor,
    the densities are clamp(eps * raw, floor, 1) with the one eps that meets the budget (water filling).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"SparsityConfig.distribution={distribution!r} is unknown: choose one of {list(DISTRIBUTIONS)}."
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 <= float(density) <= 1.0):
        raise ValueError(
            f"density {density!r} is outside [0, 1]: SparsityConfig.sparsity (= 1 - density) must be in [0, 1)."
        )
    density = float(density)
    unknown = [n for n in dense_layers if n not in shapes]
    if unknown:
        raise ValueError(
            f"dense layers {unknown} are not among the sparsified tensors {list(shapes)[:4]}"
            f"{' ...' if len(shapes) > 4 else ''}: name them exactly as model.named_parameters() does."
        )
    numel = {name: _numel(shape) for name, shape in shapes.items()}
    total = sum(numel.values())
    if max_layer_sparsity is not None:
        return _water_fill(shapes, numel, density, distribution, set(dense_layers), float(max_layer_sparsity))
    dense = set(dense_layers) | {n for n, k in numel.items() if k == 0}
    out: dict[str, float] = {}
    while True:
        budget = density * total - sum(numel[n] for n in dense)  # entries the non-dense layers share
        rest = [n for n in shapes if n not in dense]
        if budget < -1e-9 * max(total, 1):  # only layers named dense can overdraw: capping frees budget
            held = sum(numel[n] for n in dense_layers)
            raise ValueError(
                f"SparsityConfig.sparsity={1.0 - density:.6g} cannot be met with distribution={distribution!r}: the "
                f"layers kept dense {sorted(dense_layers)} hold {held} of the {total} sparsified weights, so the "
                f"sparsity can be at most {1.0 - held / max(total, 1):.6g}. Lower SparsityConfig.sparsity to at most "
                "that, or keep fewer layers dense."
            )
        raw = {n: _raw_density(shapes[n], distribution) for n in rest}
        divisor = sum(raw[n] * numel[n] for n in rest)
        eps = max(budget, 0.0) / divisor if rest else 0.0
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    for name in shapes:
        out[name] = 1.0 if name in dense else eps * raw[name]
    return out


def _water_fill(
    shapes: Mapping[str, Sequence[int]],
    numel: Mapping[str, int],
    density: float,
    distribution: str,
    dense: set[str],
    cap: float,
) -> dict[str, float]:
    """Densities clamp(eps * raw, floor, 1) (1 for `dense`) whose weighted sum is `density * total`, where the
    floor of a layer is min_kept(numel, cap) / numel. The sum is piecewise linear and non-decreasing in eps, so eps
    is found exactly on the segment between two consecutive breakpoints (floor / raw and 1 / raw)."""
    total = sum(numel.values())
    budget = density * total
    lo = {n: (1.0 if n in dense else min_kept(k, cap) / k) for n, k in numel.items() if k > 0}
    raw = {n: _raw_density(shapes[n], distribution) for n in lo}
    need = sum(lo[n] * numel[n] for n in lo)
    if need > budget + 1e-9 * max(total, 1):
        raise ValueError(
            f"SparsityConfig.sparsity={1.0 - density:.6g} cannot be met with max_layer_sparsity={cap}"
            + (f" and dense_layers={sorted(dense)}" if dense else "")
            + f": every layer at its floor already keeps {need:.0f} of the {total} weights. Lower the sparsity, raise "
            "max_layer_sparsity or keep fewer layers dense."
        )

    def filled(eps: float) -> float:
        return sum(min(max(eps * raw[n], lo[n]), 1.0) * numel[n] for n in lo)

    points = sorted({0.0} | {lo[n] / raw[n] for n in lo} | {1.0 / raw[n] for n in lo})
    eps = points[-1]
    for a, b in zip(points, points[1:]):
        if filled(b) >= budget:
            fa, fb = filled(a), filled(b)
            eps = a if fb == fa else a + (budget - fa) * (b - a) / (fb - fa)
            break
    out = {n: 1.0 if k == 0 else min(max(eps * raw[n], lo[n]), 1.0) for n, k in numel.items()}
    return {n: out[n] for n in shapes}


def counts_from_densities(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], *, total: Optional[int] = None
) -> dict[str, int]:
    """Kept entries per tensor: `densities[name] * numel` rounded so that the counts add up exactly.

    The total kept is `total` when given, else sum(density * numel) rounded to the nearest integer (halves up,
    with a tolerance for floating-point error); the units left after flooring every layer go to the largest
    remainders (ties to the earlier layer). No layer gets more entries than it has.
    """
    missing = [n for n in shapes if n not in densities]
    if missing:
        raise ValueError(f"no density for tensors {missing[:5]}: give one for every tensor in shapes.")
    numel = {name: _numel(shape) for name, shape in shapes.items()}
    exact = {}
    for name in shapes:
        d = float(densities[name])
        if not (0.0 <= d <= 1.0 + 1e-9):
            raise ValueError(f"density {d!r} of {name!r} is outside [0, 1].")
        exact[name] = min(max(d, 0.0), 1.0) * numel[name]
    if total is None:
        total = math.floor(sum(exact.values()) + 0.5 + 1e-6)
    if not (0 <= total <= sum(numel.values())):
        raise ValueError(f"total={total} kept entries is outside [0, {sum(numel.values())}].")
    counts = {name: min(numel[name], math.floor(v + 1e-9)) for name, v in exact.items()}
    left = total - sum(counts.values())
    # largest remainders first (stable: ties keep layer order); only layers with room take a unit
    order = sorted(shapes, key=lambda n: -(exact[n] - counts[n]))
    while left != 0:
        step = 1 if left > 0 else -1
        candidates = [n for n in order if (counts[n] < numel[n] if step > 0 else counts[n] > 0)]
        if step < 0:
            candidates = candidates[::-1]  # take back from the smallest remainders
        if not candidates:
            break
        for name in candidates[: abs(left)]:
            counts[name] += step
            left -= step
    return counts


def random_masks_with_counts(
    shapes: Mapping[str, Sequence[int]], counts: Mapping[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Boolean CPU masks with exactly `counts[name]` True entries each, at positions drawn from `generator`.

    Pass a CPU generator seeded from `SparsityConfig.seed`: every rank then draws the same masks. Tensors are drawn
    in the order of `shapes`.
    """
    out = {}
    for name, shape in shapes.items():
        n = _numel(shape)
        k = int(counts[name])
        if not (0 <= k <= n):
            raise ValueError(f"count {k} for {name!r} is outside [0, {n}] (its shape is {tuple(shape)}).")
        flat = torch.zeros(n, dtype=torch.bool)
        if k:
            flat[torch.randperm(n, generator=generator)[:k]] = True
        out[name] = flat.view(tuple(int(d) for d in shape))
    return out
