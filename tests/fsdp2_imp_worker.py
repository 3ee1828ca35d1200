"""IMP's next-level masks from FSDP2 shards (2 gloo ranks) against `next_level_masks` on the full weights.

Every rank builds the same network (seeded), keeps an unsharded copy, shards the other as accelerate's FSDP2 does
(`fully_shard` per layer, then the root) and asks IMP for two levels on each. The weights force ties at the
thresholds: 40% of every tensor has magnitude exactly 0.1 (random signs), so each exact count ends inside a run of
equal scores and only the tie-break by global flat index decides. Layer sizes are odd (uneven shards) and one layer
has a single row (an empty shard on rank 1). Each rank writes rank_<r>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_imp_worker.py OUT
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from hf_tickets import MaskSet, SparsityConfig
from hf_tickets.distributed import is_sharded, local, masks_digest
from hf_tickets.methods import build_method
from hf_tickets.sharded import load_sharded_, rows_of

CASES = {
    "layerwise": dict(scope="layerwise"),
    "global": dict(scope="global"),
    "global_capped": dict(scope="global", max_layer_sparsity=0.6),
    "layerwise_rates": dict(scope="layerwise", layer_rates={"3": 0.5}),
}


def network() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 7), nn.Linear(7, 1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            w = layer.weight
            u = torch.rand(w.shape, generator=g)
            sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
            small = 0.05 * torch.rand(w.shape, generator=g)
            large = 0.2 + torch.rand(w.shape, generator=g)
            w.copy_(sign * torch.where(u < 0.1, small, torch.where(u < 0.5, torch.full_like(w, 0.1), large)))
            if i == 1:
                w.mul_(0.01)  # the global pool would prune this layer first: the cap has to hold it
    return model


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def ties_at_threshold(model: nn.Module, old: MaskSet, new: MaskSet) -> int:
    """Tensors where kept and newly pruned entries share a magnitude: the exact count split a tie."""
    params = dict(model.named_parameters())
    split = 0
    for name in new:
        score = params[name].detach().abs()
        kept, pruned = score[new[name]], score[old[name] & ~new[name]]
        if kept.numel() and pruned.numel() and float(kept.min()) == float(pruned.max()):
            split += 1
    return split


def bert_case() -> dict:
    """A tiny BERT sharded as accelerate does (one group per layer, the classifier as a tail group that stays
    unsharded after a forward, the root): after an evaluation forward, two global IMP levels from the shards equal
    the full model's."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import make_bert
    from torch.distributed.fsdp import fully_shard

    full = make_bert(seed=0).eval()
    sharded = copy.deepcopy(full)
    for layer in sharded.bert.encoder.layer:
        fully_shard(layer)
    fully_shard([sharded.classifier], reshard_after_forward=False)
    fully_shard(sharded)
    with torch.no_grad():
        sharded(input_ids=torch.arange(8).view(1, 8) % 100)
    unsharded_after_forward = not is_sharded(sharded.classifier.weight)
    names = [n for n, p in full.named_parameters() if p.dim() == 2 and "embeddings" not in n]
    method = build_method(SparsityConfig(method="imp", levels=2, prune_fraction=0.3, scope="global"))
    got = {}
    for kind, model in (("full", full), ("sharded", sharded)):
        current = MaskSet({n: torch.ones_like(dict(full.named_parameters())[n], dtype=torch.bool) for n in names})
        got[kind] = [current := method.next_level_masks(model, current, level) for level in (1, 2)]
    equal = [all(torch.equal(a[n], b[n]) for n in a) for a, b in zip(got["full"], got["sharded"])]
    return {"unsharded_after_forward": unsharded_after_forward, "equal": equal, "tensors": len(names)}


def dst_case(kind: str) -> dict:
    """RigL / SET updates (drop the smallest active |w|, grow by |dense gradient| or at random) from the shards against
    the same method on the full weights and gradients: the masks of three updates bitwise equal, and the shared
    generator in the same state. The weights carry the forced ties; the gradients are the same on both models."""
    from torch.distributed.tensor import distribute_tensor

    from hf_tickets.allocation import random_masks_with_counts

    full = network()
    sharded = copy.deepcopy(full)
    shard(sharded)
    names = [n for n, p in full.named_parameters() if n.endswith("weight")]
    shapes = {n: tuple(dict(full.named_parameters())[n].shape) for n in names}
    counts = {n: max(1, int(0.5 * torch.Size(s).numel())) for n, s in shapes.items()}
    start = MaskSet(random_masks_with_counts(shapes, counts, torch.Generator().manual_seed(3)))
    methods = {m: build_method(SparsityConfig(method=kind, sparsity=0.5, update_interval=1, seed=7)) for m in "fs"}
    current = {m: start for m in "fs"}
    equal = []
    g = torch.Generator().manual_seed(11)
    for step in (1, 2, 3):
        for name, p in full.named_parameters():
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad.clone()
            q = dict(sharded.named_parameters())[name]
            q.grad = distribute_tensor(grad, q.device_mesh, q.placements, src_data_rank=None)
        for m, model in (("f", full), ("s", sharded)):
            methods[m].on_train_begin(model, current[m], 100)
            methods[m].on_dense_grads(model, current[m], step)
            current[m] = methods[m].after_optimizer_step(model, current[m], step)
        a, b = current["f"], current["s"]
        equal.append(all(torch.equal(a[n], b[n].to(a[n].device)) for n in a) and a.kept() == start.kept())
    return {
        "equal": equal,
        "generator": torch.equal(methods["f"].generator.get_state(), methods["s"].generator.get_state()),
        "moved": any(not torch.equal(current["f"][n], start[n]) for n in names),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    full = network()
    sharded = copy.deepcopy(full)
    shard(sharded)
    names = [n for n, p in full.named_parameters() if n.endswith("weight")]
    result: dict = {"rank": rank, "world_size": dist.get_world_size(), "cases": {}}
    named = dict(sharded.named_parameters())
    result["sharded"] = [n for n in names if is_sharded(named[n])]
    result["local_rows"] = {n: list(local(named[n]).shape)[0] for n in names}
    for case, fields in CASES.items():
        method = build_method(SparsityConfig(method="imp", levels=2, prune_fraction=0.3, **fields))
        masks = {"full": [], "sharded": []}
        for kind, model in (("full", full), ("sharded", sharded)):
            current = MaskSet({n: torch.ones_like(dict(full.named_parameters())[n], dtype=torch.bool) for n in names})
            for level in (1, 2):
                current = method.next_level_masks(model, current, level)
                masks[kind].append(current)
        levels = []
        previous = MaskSet({n: torch.ones_like(m, dtype=torch.bool) for n, m in masks["full"][0].items()})
        for a, b in zip(masks["full"], masks["sharded"]):
            levels.append(
                {
                    "equal": a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a),
                    "digest": masks_digest(b),
                    "kept": {n: int(b[n].sum()) for n in b},
                    "ties_split": ties_at_threshold(full, previous, a),
                }
            )
            previous = a
        result["cases"][case] = levels
    result["bert"] = bert_case()
    result["dst"] = {kind: dst_case(kind) for kind in ("rigl", "set")}
    # Loading a saved file into the sharded model reads only this rank's rows and gives the full model's weights.
    path = os.path.join(out, "weights.safetensors")
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in network().state_dict().items()}, path)
    dist.barrier()
    with torch.no_grad():
        for p in sharded.parameters():
            local(p).zero_()
    load_sharded_(sharded, path)
    reference = network().state_dict()
    loaded_equal = True
    for name, tensor in sharded.state_dict().items():
        span = rows_of(tensor)
        loaded_equal &= torch.equal(local(tensor), reference[name][span.start : span.stop])
    result["load_sharded_equal"] = bool(loaded_equal)
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
