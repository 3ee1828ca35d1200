"""Where SR-STE's per-step time goes: each part of its work timed on its own, at BERT-base's size.

On an H200 an SR-STE step cost 1.7-1.9x a plain `Trainer` step (about 33 ms more; docs/nm.md), and moving the
work onto one flat buffer did not change that. This script builds the method's own flat buffers (`_Flat`) for the
72 Linear weights of BERT-base and times, with CUDA events, every operation the method runs per step:

  recompute          `_Flat.recompute(2)`: |w|, top-2 of every group of 4, flips, mask copy
  topk_only          the top-2 selection by `torch.topk` + `scatter_` (what `recompute` used until 2026-12-03)
  rank_select        the same mask from one [groups, 4, 4] comparison (ties to the lower index)
  top_n_per_group    `hf_tickets.nm.top_n_per_group`, the selection `recompute` uses now: the same rule, column by
                     column (no [groups, 4, 4] buffer)
  projection         `projection_views()`: the dense weights with pruned entries zeroed (a new buffer)
  pruned             `pruned_views()`: the decay term's input (a new buffer)
  copy_in / copy_out the foreach copies between the parameters and the dense buffer

    PYTHONPATH=. python3 benchmarks/sr_ste_parts.py --json sr_ste_parts.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/sr_ste_parts.py --cpu --reps 3   # host clock, one core
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enforcement_overhead as common  # noqa: E402  (CUDA-event marks and the statistics)

from hf_tickets.methods.nm import _Flat  # noqa: E402
from hf_tickets.nm import top_n_per_group  # noqa: E402

BERT_BASE = [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12  # q, k, v, out; up; down per layer


def rank_select(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the n largest of every row: an entry is kept when fewer than n entries of its row beat it."""
    m = groups.shape[1]
    index = torch.arange(m, device=groups.device)
    a, b = groups.unsqueeze(2), groups.unsqueeze(1)
    beats = (b > a) | ((b == a) & (index.view(1, 1, m) < index.view(1, m, 1)))
    return beats.sum(dim=2, dtype=torch.int8) < n


def time_ms(fn, reps: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    common._sync()
    times = []
    for _ in range(reps):
        start = common._mark()
        fn()
        end = common._mark()
        common._sync()
        times.append(common._elapsed_ms(start, end))
    return common._stats(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="time on this CPU (host clock) instead of a CUDA GPU")
    parser.add_argument("--json")
    opts = parser.parse_args()
    if not opts.cpu and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu)")
    torch.manual_seed(0)
    device = "cpu" if opts.cpu else "cuda"
    params = [torch.randn(shape, device=device) for shape in BERT_BASE]
    flat = _Flat([f"w{i}" for i in range(len(params))], params, [1] * len(params), 4)
    torch._foreach_copy_(flat.dense_views, params)
    flat.recompute(2)
    groups = flat.dense.view(-1, 4).abs().float()
    topk_masks = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, 1).indices, True)
    second_third = groups.sort(1, descending=True).values[:, 1:3]
    tied = second_third[:, 0] == second_third[:, 1]  # groups where topk's pick among equals decides the mask
    agreement = {}
    for name, masks in (("rank_select", rank_select(groups, 2)), ("top_n_per_group", top_n_per_group(groups, 2))):
        differ = (masks != topk_masks).any(1)
        agreement[name] = {"groups_differing_from_topk": int(differ.sum()), "of_them_tied": int((differ & tied).sum())}

    def topk_only():
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, 2, dim=1, sorted=False).indices, True)

    parts = {
        "recompute": lambda: flat.recompute(2),
        "topk_only": topk_only,
        "rank_select": lambda: rank_select(groups, 2),
        "top_n_per_group": lambda: top_n_per_group(groups, 2),
        "projection": flat.projection_views,
        "pruned": flat.pruned_views,
        "copy_in": lambda: torch._foreach_copy_(params, flat.dense_views),
        "copy_out": lambda: torch._foreach_copy_(flat.dense_views, params),
    }
    result = {
        "gpu": f"CPU, {torch.get_num_threads()} threads" if opts.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights": int(flat.dense.numel()),
        "groups": int(groups.shape[0]),
        "tied_groups": int(tied.sum()),
        "agreement_with_topk": agreement,
        "ms": {name: time_ms(fn, opts.reps) for name, fn in parts.items()},
    }
    head = f"{result['gpu']}, torch {result['torch']}"
    print(f"{head}: {result['weights']:,} weights in {result['groups']:,} groups of 4")
    for name, stats in result["ms"].items():
        print(f"  {name:12s} {stats['median']:8.3f} ms (min {stats['min']:.3f}, max {stats['max']:.3f})")
    for name, a in agreement.items():
        print(
            f"  {name}: {a['groups_differing_from_topk']} groups differ from topk's masks,"
            f" {a['of_them_tied']} of them with the 2nd and 3rd largest |w| equal"
            f" (of {result['tied_groups']} such groups)"
        )
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
