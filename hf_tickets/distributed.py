"""Rank-consistent masks under `torch.distributed` (DDP, FSDP2), and the refusal of set-ups whose masks cannot be
kept correct (DeepSpeed ZeRO-3, FSDP1, and under FSDP2 the methods whose updates are not computed from shards).

Why a module of its own: every failure it guards against is silent. Ranks that score weights on their own batches
(SNIP) or hold differently initialised weights compute different masks and DDP then averages gradients of different
networks; FSDP2 replaces parameters by sharded `DTensor`s, so masks bound to the old parameters mask nothing; ZeRO
keeps fp32 master copies of the weights that a mask on the module weights never touches. Nothing here runs in a
single process: every function returns at once when `torch.distributed` is not initialised (or has one rank).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .allocation import order_keys
from .masks import MaskSet, pack_bits

logger = logging.getLogger(__name__)


# ---- which processes -----------------------------------------------------------------------------------------------


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- masks equal on every rank -----------------------------------------------------------------------------------


def masks_digest(masks: MaskSet) -> str:
    """sha256 of the names, shapes and bits of `masks`: equal digests mean bitwise-equal masks."""
    digest = hashlib.sha256()
    for name in masks:
        mask = masks[name]
        digest.update(f"{name}:{tuple(mask.shape)};".encode())
        digest.update(pack_bits(mask).numpy().tobytes())
    return digest.hexdigest()


def gather_digests(masks: MaskSet) -> list[str]:
    """Every rank's `masks_digest`, in rank order (a collective: every rank must call it)."""
    mine = masks_digest(masks)
    if world_size() == 1:
        return [mine]
    out: list[Optional[str]] = [None] * world_size()
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]


def broadcast_masks(masks: MaskSet, src: int = 0) -> MaskSet:
    """Rank `src`'s masks on every rank (bit-packed, so BERT-base's 110M entries travel as 14 MB). A collective."""
    if world_size() == 1:
        return masks
    payload: list[Any] = [None]
    if rank() == src:
        payload = [
            {
                "masks": {n: (tuple(masks[n].shape), pack_bits(masks[n])) for n in masks},
                "metadata": dict(masks.metadata),
            }
        ]
    dist.broadcast_object_list(payload, src=src)
    from .masks import unpack_bits

    data = payload[0]
    return MaskSet({n: unpack_bits(bits, shape) for n, (shape, bits) in data["masks"].items()}, data["metadata"])


def agree_on_masks(masks: MaskSet, adopt_rank0: bool) -> MaskSet:
    """The masks every rank will enforce.

    Args:
        masks: this rank's masks.
        adopt_rank0: when ranks differ, take rank 0's masks (True: the initial masks, where ranks may score on their
            own batches or hold differently seeded weights that DDP will overwrite with rank 0's), or raise
            (False: later updates, which every rank computes from the same averaged gradients and weights, so a
            difference is a bug that must not train on).

    A collective (every rank must call it); one small `all_gather` of digests when the ranks agree.
    """
    if world_size() == 1:
        return masks
    digests = gather_digests(masks)
    if len(set(digests)) == 1:
        return masks
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if not adopt_rank0:
        raise RuntimeError(
            f"ranks {differ} computed masks that differ from rank 0's: training on would average the gradients of "
            "different networks. Methods must draw random numbers from a generator seeded from SparsityConfig.seed "
            "and score only weights or gradients that are the same on every rank (docs/distributed.md)."
        )
    logger.info("Ranks %s computed other initial masks than rank 0 (own batches or seeds): rank 0's are used", differ)
    return broadcast_masks(masks, src=0)


# ---- sharded parameters (FSDP2) ----------------------------------------------------------------------------------


@functools.cache  # asked for every tensor of every step (MaskEnforcer): the import machinery once, not each time
def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """True for a `DTensor` (an FSDP2 parameter, its gradient or its optimizer state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: a view of a DTensor's local shard (writes reach the parameter), or the
    tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The entries of a full `mask` that match this rank's shard of `param`, on the shard's device.

    Every rank holds the full (identical) mask, so the shard is cut locally with the parameter's own placements
    (`src_data_rank=None`: no communication). Masking a shard with it is then a local `masked_fill_`.
    """
    if not is_sharded(param):
        return mask.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(
        mask.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
    )
    return shard.to_local().contiguous()


def model_is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 `DTensor`s, or it holds FSDP2 modules (whose parameters a
    forward may have left unsharded: see `sharded.reshard_`)."""
    if any(is_sharded(p) for p in model.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


# ---- global thresholds without gathering the weights ---------------------------------------------------------------


def _key_to_float(key: int) -> float:
    bits = key if key >= 0 else (-(key + 1)) | -0x80000000
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item())


def kth_smallest(local_scores: Sequence[torch.Tensor], k: int, group: Optional[Any] = None) -> float:
    """The k-th smallest (1-based) of all ranks' scores together, exactly, without moving any score off its rank.

    Bisection over the float32 order (32 rounds): each round counts the local scores at or below a candidate and
    sums the counts with one `all_reduce` of a single integer. What a global magnitude threshold over FSDP2 shards
    needs; equal to `torch.cat(all scores).kthvalue(k)` in float32.
    """
    keys = [order_keys(s.reshape(-1)) for s in local_scores if s.numel()]
    return _key_to_float(kth_smallest_keys([keys], [k], group)[0])


def collective_device(fallback: torch.device, group: Optional[Any] = None) -> torch.device:
    """Where a small tensor must live for a collective of `group`: the current GPU under NCCL (it takes CUDA
    tensors only), else `fallback` (gloo takes CPU tensors)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def kth_smallest_keys(
    pools: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], group: Optional[Any] = None
) -> list[int]:
    """For every pool of local `order_keys` tensors, the k-th smallest key over all ranks (1-based `ks[i]`).

    All pools bisect together: 32 rounds, each one `all_reduce` of one integer per pool (an IMP level of BERT-base
    with a threshold per tensor costs 32 small collectives, not 32 per tensor). No key leaves its rank.
    """
    first = next((x for pool in pools for x in pool), None)
    device = collective_device(first.device if first is not None else torch.device("cpu"), group)
    total = torch.tensor([sum(int(x.numel()) for x in pool) for pool in pools], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    for k, n in zip(ks, total.tolist()):
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is outside 1..{n}, the number of scores on all ranks.")
    lo = [-(2**31)] * len(pools)  # each answer's key lies in [lo, hi]
    hi = [2**31 - 1] * len(pools)
    while any(a < b for a, b in zip(lo, hi)):
        mid = [(a + b) // 2 for a, b in zip(lo, hi)]
        count = torch.tensor(
            [sum(int((x <= m).sum()) for x in pool) for pool, m in zip(pools, mid)], dtype=torch.int64, device=device
        )
        if dist.is_initialized():
            dist.all_reduce(count, group=group)
        for i, (c, k) in enumerate(zip(count.tolist(), ks)):
            if lo[i] < hi[i]:
                lo[i], hi[i] = (lo[i], mid[i]) if c >= k else (mid[i] + 1, hi[i])
    return lo


# ---- what cannot be kept correct is refused -------------------------------------------------------------------------


def deepspeed_stage(args: Any, accelerator: Any = None) -> Optional[int]:
    """The ZeRO stage of a DeepSpeed run, or None without DeepSpeed: from the accelerator (an `accelerate launch`
    DeepSpeed config) or `TrainingArguments.deepspeed` (a JSON path or dict). Read before DeepSpeed is initialised,
    so that a refusal costs no start-up."""
    from accelerate.utils import DistributedType

    if accelerator is not None and getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return int(getattr(plugin, "zero_stage", 0) or 0)
    config = getattr(args, "hf_deepspeed_config", None)
    if config is not None:
        return int(config.config.get("zero_optimization", {}).get("stage", 0))
    raw = getattr(args, "deepspeed", None)
    if not raw:
        return None
    if not isinstance(raw, dict):
        import json

        with open(raw, encoding="utf-8") as fh:
            raw = json.load(fh)
    return int(raw.get("zero_optimization", {}).get("stage", 0))


def fsdp_version(accelerator: Any) -> Optional[int]:
    """1 or 2 when the accelerator shards the model with FSDP, else None."""
    from accelerate.utils import DistributedType

    if getattr(accelerator, "distributed_type", None) != DistributedType.FSDP:
        return None
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)


def check_supported(args: Any, accelerator: Any, method: Any) -> None:
    """Refuse, before any training, a launch whose masks hf_tickets cannot keep correct.

    * DeepSpeed ZeRO-3: parameters are partitioned and gathered only inside forward and backward, so neither the
      masks nor the re-masking after a step can reach them;
    * DeepSpeed ZeRO-1/2 with an iterative method (IMP) or one that acts during training (RigL/SET, gradual,
      SR-STE): rewinding would have to restore the partitioned fp32 master weights and optimizer state, and
      DeepSpeed steps inside `backward`, so no hook sees dense gradients before the step. Fixed masks are kept by
      re-masking the fp32 master partitions after every step (`zero_master_weights_`);
    * FSDP1: its flat parameters hide the per-tensor names the masks are keyed by (use FSDP2, `fsdp_version: 2`);
    * FSDP2 with a method whose updates are not computed from shards (SR-STE and periodic N:M recomputation:
      they keep their own dense copy of the weights and swap it into the parameters every step), or IMP on a peft
      (LoRA) model. Supported: IMP, whose levels are scored from the shards (`hf_tickets.sharded`) and rewound
      through accelerate's FSDP checkpoint helpers (it needs `FULL_STATE_DICT` so that level folders hold the
      single-device `model.safetensors`); gradual magnitude pruning, RigL and SET, whose updates rank each rank's
      rows with exact counts from collectives (`SparsityMethod.updates_from_shards`); masks fixed before sharding.
    """
    name = type(method).__name__
    stage = deepspeed_stage(args, accelerator)
    if stage is not None:
        if stage >= 3:
            raise ValueError(
                f"DeepSpeed ZeRO-{stage} is not supported by hf_tickets: ZeRO-3 partitions the parameters and gathers "
                "them only inside forward and backward, so masks cannot be enforced on them and pruned weights would "
                "come back. Use DeepSpeed ZeRO-2 (recipes/accelerate/deepspeed_zero2.yaml) or FSDP2 "
                "(recipes/accelerate/fsdp2.yaml)."
            )
        if method.iterative or method.acts_during_training():
            raise ValueError(
                f"{name} is not supported under DeepSpeed ZeRO-{stage}: "
                + (
                    "rewinding would have to restore the partitioned fp32 master weights and optimizer state."
                    if method.iterative
                    else "it changes masks during training from dense gradients or weights, which ZeRO holds in "
                    "partitions (and DeepSpeed steps the optimizer inside backward, before any hook sees them)."
                )
                + " Under ZeRO-2 use masks fixed before training (magnitude, random, N:M, SNIP, GraSP, SynFlow), "
                "or train with DDP (recipes/accelerate/ddp.yaml)."
            )
    version = fsdp_version(accelerator)
    if version == 1:
        raise ValueError(
            "FSDP1 is not supported by hf_tickets: its flat parameters lose the per-tensor names masks are keyed by. "
            "Use FSDP2: fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp2.yaml)."
        )
    if version == 2 and method.iterative and getattr(method, "inner", None) is not None:
        raise ValueError(
            "IMP on a peft (LoRA) model is not supported under FSDP2: its levels load adapters onto a frozen pruned "
            "base, which is not wired up for sharded parameters. Train it with DDP (recipes/accelerate/ddp.yaml) or "
            "on one device."
        )
    if version == 2 and method.iterative:
        kind = str(getattr(accelerator.state.fsdp_plugin, "state_dict_type", "FULL_STATE_DICT"))
        if "FULL_STATE_DICT" not in kind:
            raise ValueError(
                f"{name} under FSDP2 needs fsdp_state_dict_type: FULL_STATE_DICT (got {kind}): each level folder "
                "holds the single-device model.safetensors, which transformers' save_model writes under FSDP only "
                "from a full state dict. Set it in the accelerate config (recipes/accelerate/fsdp2.yaml does)."
            )
    if version == 2 and method.has_step_hooks() and not method.updates_from_shards:
        raise ValueError(
            f"{name} changes masks during training from its own dense weights, which are not wired to FSDP2 "
            "shards: not supported under FSDP2 yet. Under FSDP2 use IMP, gradual magnitude pruning, RigL, SET or a "
            "method whose masks are fixed before training (magnitude, random, N:M one-shot, SNIP, GraSP, SynFlow), "
            "or train with DDP (recipes/accelerate/ddp.yaml)."
        )


# ---- DeepSpeed ZeRO-1/2: the fp32 master weights -------------------------------------------------------------------


@torch.no_grad()
def zero_master_weights_(params: Sequence[torch.nn.Parameter], masks: Sequence[torch.Tensor]) -> int:
    """Zero the pruned entries of DeepSpeed ZeRO-1/2's fp32 master partitions (and their optimizer state).

    ZeRO's optimizer steps an fp32 copy of every weight and copies it back into the module; a zero written into the
    module weight alone is overwritten by the next step. DeepSpeed exposes each parameter's fragment of its flat fp32
    partition as `param._hp_mapping` (`hp_fragment`, and `lp_fragment_address` = where the fragment lies in the
    flattened parameter); this rank masks its own fragments only (no communication). Returns the number of
    parameters whose fragment lives on this rank.
    """
    touched = 0
    for param, mask in zip(params, masks):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        address = mapping.lp_fragment_address
        pruned = ~mask.reshape(-1).narrow(0, address.start, address.numel).to(mapping.hp_fragment.device)
        mapping.hp_fragment.view(-1).masked_fill_(pruned, 0)
        for state in (mapping.optim_fragment or {}).values():  # None until the optimizer's first step
            if isinstance(state, torch.Tensor) and state.numel() == pruned.numel():
                state.view(-1).masked_fill_(pruned, 0)
        touched += 1
    return touched
