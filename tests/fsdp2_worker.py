"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on CPU with gloo: hf_tickets' enforcement path on sharded parameters.

accelerate does not offer FSDP for CPU processes, so this worker shards the model itself, exactly as accelerate's
FSDP2 preparation does (one `fully_shard` per encoder layer, then the root), and runs the steps `SparsityCallback`
runs: mask the gradients, step, re-mask the weights. Each rank reads its half of every global batch; a single process
reading whole batches (`world_size` 1, run by the test too) must end with the same weights.

It records: leaks (summed over ranks) after every step, the masks' local shards against their parameters' shards,
the global magnitude threshold from the shards (`kth_smallest`) against the full tensors' one, optimizer state of
newly pruned entries zeroed, and the saved files (model.safetensors from the full state dict, masks.safetensors).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py OUT [STEPS]
    python tests/fsdp2_worker.py OUT [STEPS]       # the single-device reference
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import make_bert, make_dataset  # noqa: E402

from hf_tickets import SparsityConfig, apply_sparsity  # noqa: E402
from hf_tickets.distributed import is_sharded, kth_smallest, local, world_size  # noqa: E402
from hf_tickets.enforce import MaskEnforcer  # noqa: E402
from hf_tickets.masks import MaskSet  # noqa: E402

GLOBAL_BATCH = 8


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)


def batches(steps: int, rank: int, world: int):
    rows = make_dataset("bert", GLOBAL_BATCH * steps).rows
    per_rank = GLOBAL_BATCH // world
    for s in range(steps):
        mine = rows[s * GLOBAL_BATCH + rank * per_rank : s * GLOBAL_BATCH + (rank + 1) * per_rank]
        yield {k: torch.stack([r[k] for r in mine]) for k in mine[0]}


def leaks(model: torch.nn.Module, masks: MaskSet) -> int:
    """Pruned weights not exactly zero, over all ranks (each counts its own shard)."""
    count = torch.tensor([MaskEnforcer(masks, model).count_violations()])
    if dist.is_initialized():
        dist.all_reduce(count)
    return int(count.item())


def main(out: str, steps: int) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = make_bert(seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.eval()  # no dropout: the sharded and the single-device run see the same function
    masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.6))  # full masks, before sharding
    if distributed:
        shard(model)
    enforcer = MaskEnforcer(masks, model)
    named = dict(model.named_parameters())
    result: dict = {"rank": rank, "world_size": world, "sharded": [n for n in masks if is_sharded(named[n])]}
    # Every mask shard has its parameter's local shape: the multiplies (masked_fill_) are local.
    result["shards_match"] = all(
        tuple(m.shape) == tuple(local(named[n]).shape) for n, m in zip(masks, enforcer.local_masks())
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    result["leaks"] = []
    for inputs in batches(steps, rank, world):
        model(**inputs).loss.backward()
        enforcer.mask_grads_()
        optimizer.step()
        optimizer.zero_grad()
        enforcer.mask_weights_(trainable_only=True)
        result["leaks"].append(leaks(model, masks))

    # A global magnitude threshold from the shards, by a collective (no weights leave their rank).
    scores = [local(named[n].detach()).abs()[keep] for n, keep in zip(masks, enforcer.local_masks())]
    alive = sum(int(m.sum()) for m in masks.values())
    k = alive // 5  # prune 20% of the alive weights, as an IMP level
    result["threshold"] = kth_smallest(scores, k)
    # The check gathers the full weights (the threshold above never did): torch's kthvalue over all of them.
    full = {n: (named[n].full_tensor() if is_sharded(named[n]) else named[n]).detach() for n in masks}
    alive_scores = torch.cat([full[n].abs()[masks[n]] for n in masks])
    result["threshold_full"] = float(alive_scores.kthvalue(k).values)

    # Masks shrink (as at a level end): the new pruned entries' Adam moments are zeroed on every shard.
    threshold = result["threshold"]
    smaller = MaskSet({n: masks[n] & (full[n].abs() > threshold) for n in masks}, masks.metadata)
    result["pruned_now"] = smaller.numel() - smaller.kept()
    new = MaskEnforcer(smaller, model)
    new.zero_optimizer_state_(optimizer)
    new.mask_weights_()
    stale = 0
    for n, keep in zip(smaller, new.local_masks()):
        for value in optimizer.state[named[n]].values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                stale += int((local(value)[~keep] != 0).sum())
    result["stale_state"] = stale
    result["leaks_after_shrink"] = leaks(model, smaller)

    # The saved files: the full state dict (every rank takes part; rank 0 writes) and the masks.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options) if distributed else model.state_dict()
    if rank == 0:
        folder = os.path.join(out, "model")
        model_cls = type(make_bert())
        plain = model_cls(model.config)
        plain.load_state_dict(state)
        plain.save_pretrained(folder)
        smaller.save(folder)
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as fh:
        json.dump(result, fh)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
