"""IMP on FSDP2 shards: next-level masks, weight loading and start digests of `DTensor` parameters, with no rank
ever holding another rank's weights.

Why a module of its own: an IMP level ends by scoring every weight and pruning an exact count, globally or per
tensor. Under FSDP2 each rank holds rows of every parameter (`Shard(0)` on a 1-D mesh), so gathering the weights to
score them would undo the sharding. Here each rank scores its own rows; the thresholds come from a bisection whose
rounds sum integer counts over the ranks (`distributed.kth_smallest_keys`); entries tied at a threshold are kept in
global flat order (`allocation._keep_top`'s rule), which needs only the tie counts of every rank; and the full
`MaskSet` every rank holds is assembled from bit-packed mask shards (1 bit per weight). The result is bitwise the
masks `masks_from_scores` gives on the full weights.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from .allocation import _pools, capped_counts, check_layer_rates, masks_from_scores, order_keys, pool_keep_count
from .distributed import is_sharded, kth_smallest_keys, local, model_is_sharded, rank, world_size
from .masks import pack_bits, unpack_bits
from .scoring import magnitude_scores


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a tensor's dim 0 (FSDP2 shards parameters on dim 0)."""

    start: int
    stop: int


def row_bounds(numel0: int, ranks: int, coordinate: int) -> Rows:
    """Rows of a dim of size `numel0` that `Shard(0)` gives mesh coordinate `coordinate` of `ranks` (torch.chunk's
    split: ceil(n / ranks) rows each, the last ones shorter or empty)."""
    chunk = -(-numel0 // ranks) if numel0 else 0
    start = min(coordinate * chunk, numel0)
    return Rows(start, min(start + chunk, numel0))


def check_layout(param: torch.Tensor, name: str) -> None:
    """Only FSDP2's layout is reproduced exactly: `Shard(0)` over a 1-D mesh of every rank, in rank order."""
    if not is_sharded(param):
        return
    from torch.distributed.tensor import Shard

    mesh, placements = param.device_mesh, param.placements
    ok = (
        mesh.ndim == 1
        and len(placements) == 1
        and type(placements[0]) is Shard
        and placements[0].dim == 0
        and mesh.mesh.flatten().tolist() == list(range(world_size()))
    )
    if not ok:
        raise ValueError(
            f"{name!r} is sharded as {placements} over a mesh of shape {tuple(mesh.mesh.shape)}: hf_tickets computes "
            "IMP levels on FSDP2's own layout only (Shard(0) over one mesh dimension spanning every rank, full "
            "shard). Use fsdp_version: 2 with full sharding, or train with DDP."
        )


def rows_of(param: torch.Tensor, for_rank: Optional[int] = None) -> Rows:
    """The rows of `param` (global shape) that rank `for_rank` (default: this rank) holds. A plain tensor is held
    whole by every rank; for scoring it counts as rank 0's (`owned_rows`)."""
    r = rank() if for_rank is None else for_rank
    if not is_sharded(param):
        return Rows(0, int(param.shape[0]) if param.dim() else 1)
    rows = row_bounds(int(param.shape[0]), param.device_mesh.size(), r)
    if for_rank is None and rows.stop - rows.start != int(local(param).shape[0]):
        raise ValueError(f"a shard of {tuple(param.shape)} holds {local(param).shape[0]} rows, not {rows}.")
    return rows


def owned_rows(param: torch.Tensor, for_rank: Optional[int] = None) -> Rows:
    """The rows rank `for_rank` scores: its shard, or the whole of a plain tensor for rank 0 and nothing for others."""
    r = rank() if for_rank is None else for_rank
    if is_sharded(param):
        return rows_of(param, r)
    return rows_of(param) if r == 0 else Rows(0, 0)


def _row_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


# ---- next-level masks from the shards ---------------------------------------------------------------------------


@dataclass
class _Group:
    """Entries that share one exact-count selection: a pool, or one tensor's forced entries under a cap."""

    names: list[str]
    n_keep: int


def _select(groups: list[_Group], keys: Mapping[str, torch.Tensor], numel: Mapping[str, int]) -> dict:
    """Per group, keep exactly `n_keep` of the highest keys over all ranks, ties at the threshold in global flat order
    (pool order of the tensors, then rows): `allocation._keep_top` on the full scores. Returns name -> local keep.

    `keys[name]`: this rank's flat keys of its owned rows (ranks own rows in rank order); `numel[name]`: all entries.
    """
    out = {n: torch.zeros_like(keys[n], dtype=torch.bool) for g in groups for n in g.names}
    live = [g for g in groups if g.n_keep > 0]
    if not live:
        return out
    totals = [sum(numel[n] for n in g.names) for g in live]
    ks = [total - g.n_keep + 1 for g, total in zip(live, totals)]  # the n_keep-th largest = this smallest
    thresholds = kth_smallest_keys([[keys[n] for n in g.names if keys[n].numel()] for g in live], ks)
    names = [n for g in live for n in g.names]
    threshold_of = {n: t for g, t in zip(live, thresholds) for n in g.names}
    above = {n: keys[n] > threshold_of[n] for n in names}
    tied = {n: keys[n] == threshold_of[n] for n in names}
    mine = torch.tensor([[int(above[n].sum()), int(tied[n].sum())] for n in names], dtype=torch.int64)
    counts = _all_gather_counts(mine)  # [ranks, tensors, (above, tied)]
    position = {n: i for i, n in enumerate(names)}
    me = rank()
    for g in live:
        need = g.n_keep - int(counts[:, [position[n] for n in g.names], 0].sum())
        before = 0  # ties earlier in global flat order than this rank's rows of the tensor
        for n in g.names:
            i = position[n]
            ties_here = before + int(counts[:me, i, 1].sum())
            out[n] = above[n] | (tied[n] & (torch.cumsum(tied[n], 0) + ties_here <= need))
            before += int(counts[:, i, 1].sum())
    return out


def _all_gather_counts(mine: torch.Tensor) -> torch.Tensor:
    """Every rank's small int64 table, stacked in rank order (one collective)."""
    if world_size() == 1:
        return mine.unsqueeze(0)
    tables: list[Any] = [None] * world_size()
    dist.all_gather_object(tables, mine)
    return torch.stack(tables)


def sharded_masks_from_scores(
    scores: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    rate: float,
    *,
    scope: str = "global",
    layer_rates: Optional[dict] = None,
    current: Mapping[str, torch.Tensor],
    relative: bool = False,
    max_layer_sparsity: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """`allocation.masks_from_scores` for FSDP2 parameters, bitwise: full boolean masks (CPU) on every rank.

    Args:
        scores: name -> this rank's scores of its owned rows of `params[name]` (`owned_rows`), any shape whose
            row-major order is those rows'.
        params: name -> the (sharded) parameter: its global shape and layout.
        current: the full masks every rank holds; `rate`, `scope`, `layer_rates`, `relative`, `max_layer_sparsity`:
            as for `masks_from_scores`.

    A collective: every rank calls it with the same names and arguments.
    """
    names = list(scores)
    check_layer_rates(names, layer_rates)
    for n in names:
        check_layout(params[n], n)
    ranks = world_size()
    rows = {n: [owned_rows(params[n], r) for r in range(ranks)] for n in names}
    shapes = {n: tuple(int(d) for d in params[n].shape) for n in names}
    keys: dict[str, torch.Tensor] = {}
    for n in names:
        mine = rows[n][rank()]
        alive = current[n].reshape(shapes[n][0] if shapes[n] else 1, -1)[mine.start : mine.stop].reshape(-1)
        s = scores[n].detach().float().reshape(-1).cpu().masked_fill(~alive.cpu(), float("-inf"))
        keys[n] = order_keys(s)
    alive_of = {n: int(current[n].sum()) for n in names}
    numel_of = {n: math.prod(shapes[n]) for n in names}
    plan = []
    for pool, factor in _pools(names, scope, layer_rates):
        n_keep = pool_keep_count(
            sum(numel_of[n] for n in pool), sum(alive_of[n] for n in pool), rate * factor, relative
        )
        plan.append((pool, n_keep))
    if max_layer_sparsity is None:
        local_keep = _select([_Group(pool, k) for pool, k in plan], keys, numel_of)
    else:
        forced_groups, rest_groups = [], []
        for pool, n_keep in plan:
            counts = capped_counts(
                [numel_of[n] for n in pool], [alive_of[n] for n in pool], n_keep, max_layer_sparsity, pool
            )
            forced_groups += [_Group([n], c) for n, c in zip(pool, counts)]
            rest_groups.append(_Group(pool, n_keep - sum(counts)))
        forced = _select(forced_groups, keys, numel_of)
        lowest = int(order_keys(torch.tensor([float("-inf")]))[0])
        rest_keys = {n: keys[n].masked_fill(forced[n], lowest) for n in names}
        extra = _select(rest_groups, rest_keys, numel_of)
        local_keep = {n: forced[n] | extra[n] for n in names}
    return _assemble(local_keep, shapes, rows)


def keep_top_per_tensor(
    keys: Mapping[str, torch.Tensor], counts: Mapping[str, int], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per tensor, this rank's part of `allocation._keep_top([full keys], counts[name])`: the `counts[name]` highest
    `order_keys` of the whole tensor kept, ties at the threshold in flat order. `keys[name]`: this rank's flat keys
    of its owned rows. A collective (what RigL's per-layer drop and grow need)."""
    numel = {n: math.prod(int(d) for d in params[n].shape) for n in keys}
    return _select([_Group([n], int(counts[n])) for n in keys], keys, numel)


def gather_masks(
    local_keep: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The full masks on every rank from each rank's mask rows of its owned rows (bit-packed; a collective)."""
    rows = {n: [owned_rows(params[n], r) for r in range(world_size())] for n in local_keep}
    shapes = {n: tuple(int(d) for d in params[n].shape) for n in local_keep}
    return _assemble(local_keep, shapes, rows)


def owned_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's owned rows of a full tensor shaped like `param` (a mask, a draw of noise), flattened."""
    span = owned_rows(param)
    shape = tuple(param.shape)
    return full.reshape(shape[0] if shape else 1, -1)[span.start : span.stop].reshape(-1)


def model_magnitude_masks(model: nn.Module, names: list[str], rate: float, **kwargs: Any) -> dict[str, torch.Tensor]:
    """`masks_from_scores(magnitude_scores(...), rate, **kwargs)` over the parameters `names` of `model`: what IMP's
    next level and gradual magnitude pruning compute. Under FSDP2 from each rank's shards (a collective, bitwise the
    same masks), otherwise from the parameters themselves."""
    sharded = model_is_sharded(model)
    if sharded:
        reshard_(model)
    params = dict(model.named_parameters())
    targets = {name: params[name] for name in names}
    if not sharded:
        return masks_from_scores(magnitude_scores(targets), rate, **kwargs)
    scores = magnitude_scores({name: owned_local(p) for name, p in targets.items()})
    return sharded_masks_from_scores(scores, targets, rate, **kwargs)


def _assemble(local_keep: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], rows: Mapping[str, list[Rows]]):
    """The full masks on every rank from every rank's local ones: one `all_gather_object` of bit-packed shards."""
    names = list(local_keep)
    flat = torch.cat([local_keep[n].reshape(-1) for n in names]) if names else torch.zeros(0, dtype=torch.bool)
    payload = (int(flat.numel()), pack_bits(flat))
    if world_size() == 1:
        gathered = [payload]
    else:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, payload)
    parts = [unpack_bits(bits, (numel,)) for numel, bits in gathered]
    full = {n: torch.zeros(math.prod(shapes[n]), dtype=torch.bool) for n in names}
    offsets = [0] * len(parts)
    for n in names:
        per_row = _row_numel(shapes[n])
        for r, part in enumerate(parts):
            span = rows[n][r]
            count = (span.stop - span.start) * per_row
            full[n][span.start * per_row : span.start * per_row + count] = part[offsets[r] : offsets[r] + count]
            offsets[r] += count
    return {n: full[n].view(shapes[n]) for n in names}


def owned_local(param: torch.Tensor) -> torch.Tensor:
    """This rank's owned rows of `param` as a local tensor (its shard; a plain tensor's whole on rank 0)."""
    if is_sharded(param):
        return local(param)
    flat = param if param.dim() else param.reshape(1)
    return flat if rank() == 0 else flat[:0]


def reshard_(model: nn.Module) -> None:
    """Put every FSDP2 module back to its sharded parameters: a forward (evaluation) leaves the groups that
    accelerate builds with `reshard_after_forward=False` holding plain unsharded tensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- loading saved weights into a sharded model ---------------------------------------------------------------------


def load_sharded_(model: nn.Module, file: str) -> None:
    """Load a `model.safetensors` into a model whose parameters are FSDP2 `DTensor`s, each rank reading only its own
    rows (`safe_open(...).get_slice`), so no rank holds another's weights. Tensors the file lacks keep their values
    (the second name of a tied weight, which safetensors drops); names the model lacks are an error."""
    from safetensors import safe_open

    reshard_(model)
    state = model.state_dict()
    with torch.no_grad(), safe_open(file, framework="pt") as fh:
        unknown = sorted(set(fh.keys()) - set(state))
        if unknown:
            raise ValueError(
                f"{file} holds weights {unknown[:3]} that {type(model).__name__} does not have (under FSDP2 a saved "
                "file is read by the model's own tensor names, row by row; a transformers 5 model saved under other "
                "names, such as ViT, is not supported there)."
            )
        for name in fh.keys():
            target = state[name]
            if is_sharded(target):
                check_layout(target, name)
                span = rows_of(target)
                value = fh.get_slice(name)[span.start : span.stop]
            else:
                value = fh.get_tensor(name)
            mine = local(target)
            if tuple(value.shape) != tuple(mine.shape):
                raise ValueError(
                    f"{file}: {name!r} has rows of shape {tuple(value.shape)}, the shard {tuple(mine.shape)}."
                )
            mine.copy_(value.to(device=mine.device, dtype=mine.dtype))


def weights_file(path: str) -> str:
    """`path` if it is a file, else its `model.safetensors`."""
    from .files import WEIGHTS_NAME

    return path if os.path.isfile(path) else os.path.join(path, WEIGHTS_NAME)


# ---- start digests without gathering --------------------------------------------------------------------------------


def sharded_digest(pieces: list[tuple[str, tuple, torch.dtype, Rows, torch.Tensor]]) -> str:
    """sha256 over every rank's owned rows: (name, global shape, dtype, rows, bytes) per tensor, the ranks' digests
    combined in rank order. Equal for equal sharded weights; not the single-device `weights_digest` (that would need
    the bytes in one place). A collective."""
    h = hashlib.sha256()
    for name, shape, dtype, span, value in pieces:
        flat = value.detach().to("cpu", dtype).contiguous().reshape(-1)
        h.update(f"{name}:{shape}:{dtype}:{span.start}-{span.stop};".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    mine = h.hexdigest()
    if world_size() == 1:
        return mine
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, mine)
    return hashlib.sha256("".join(str(d) for d in every).encode()).hexdigest()


def live_digest(model: nn.Module) -> str:
    """`sharded_digest` of a sharded model's state (what the arm starts from)."""
    reshard_(model)
    pieces = []
    for name, tensor in model.state_dict().items():
        pieces.append((name, tuple(tensor.shape), tensor.dtype, owned_rows(tensor), owned_local(tensor)))
    return sharded_digest(pieces)


def planned_digest(model: nn.Module, sources: list[str], masks: Mapping[str, torch.Tensor]) -> str:
    """`live_digest` of `model` once `sources` (weight files or folders, a later one wins) are loaded and `masks`
    applied, computed from the files' rows of this rank without touching the model."""
    from safetensors import safe_open

    reshard_(model)
    state = model.state_dict(keep_vars=True)
    values = {name: owned_local(tensor).detach().clone() for name, tensor in state.items()}
    loaded: dict[int, str] = {}  # id of a loaded tensor -> its name: the second name of a tied weight follows it
    for source in sources:
        with safe_open(weights_file(source), framework="pt") as fh:
            for name in fh.keys():
                if name in state:
                    span = owned_rows(state[name])
                    if state[name].dim():
                        values[name] = fh.get_slice(name)[span.start : span.stop]
                    elif span.stop > span.start:
                        values[name] = fh.get_tensor(name).reshape(1)
                    loaded[id(state[name])] = name
    for name, tensor in state.items():
        alias = loaded.get(id(tensor))
        if alias is not None and alias != name:
            values[name] = values[alias]
    pieces = []
    for name, tensor in state.items():
        span = owned_rows(tensor)
        value = values[name]
        if name in masks:
            shape = tuple(tensor.shape)
            keep = masks[name].reshape(shape[0], -1)[span.start : span.stop].reshape(value.shape)
            value = value.masked_fill(~keep.to(value.device), 0)
        pieces.append((name, tuple(tensor.shape), tensor.dtype, span, value))
    return sharded_digest(pieces)
