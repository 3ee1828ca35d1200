"""2:4 inference end to end: dense vs `sparse_inference` (measured dispatch) vs converting every 2:4 Linear.

Models are built from configs with random weights (nothing is downloaded), pruned 2:4 by magnitude on every
Linear weight with `apply_sparsity(model, SparsityConfig(pattern="2:4"))`, cast to bfloat16 and run in eval mode:

  bert-base    BertModel (12 x 768, FFN 3072), batch 32 x 512 tokens (16384 tokens)
  bert-large   BertModel (24 x 1024, FFN 4096), batch 32 x 512 tokens
  vit-b16      ViTModel (ViT-B/16, 224 x 224), batch 256 images (197 tokens each)
  mlp          one transformer MLP block, 4096 -> 14336 -> 4096 (GELU), 65536 tokens

Arms, all resident on the GPU, each a deep copy of the same pruned model:
  dense        the pruned model as it is (dense GEMMs over exact zeros)
  dispatch     `sparse_inference(model, batch)`: a Linear is converted only where its own timing at this batch
               shape shows sparse >= `--min-speedup` x faster; the rest stays dense
  all_sparse   every convertible 2:4 Linear converted (`min_speedup=0`): what a user who converts everything gets

Forward passes are timed with CUDA events (the project's helpers in enforcement_overhead.py), `--iters` passes per
arm per round, `--rounds` rounds with the arm order reversed every other round; the ratio of an arm is the median
over rounds of dense ms / arm ms (> 1 = faster than dense), with its IQR.

    PYTHONPATH=. python3 benchmarks/nm_inference.py --json docs/results/nm_inference_h200.json
    python benchmarks/nm_inference.py --tiny                                     # CPU smoke run (no timing)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enforcement_overhead as common  # noqa: E402  (CUDA-event marks and the ratio statistics)

from hf_tickets import SparsityConfig, apply_sparsity, sparse_inference  # noqa: E402

CUDA = torch.cuda.is_available()


class MLPBlock(nn.Module):
    """The feed-forward block of a 4096-wide transformer (Llama-3-8B's sizes), GELU."""

    def __init__(self, hidden: int = 4096, inner: int = 14336) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def build(name: str, tiny: bool) -> tuple[nn.Module, dict]:
    """The model (random init, from a config) and one example batch of inputs at the benchmark's shape."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if name in ("bert-base", "bert-large"):
        sizes = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        cfg = BertConfig(**(sizes if name == "bert-large" else {}))
        batch, seq = 32, 512
        if tiny:
            cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
            batch, seq = 2, 16
        model = BertModel(cfg, add_pooling_layer=False)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "vit-b16":
        cfg = ViTConfig()  # ViT-B/16 at 224 x 224
        batch = 256
        if tiny:
            cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            image_size=32, patch_size=8)
            batch = 2
        model = ViTModel(cfg, add_pooling_layer=False)
        return model, {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size)}
    if name == "mlp":
        hidden, inner, tokens = (64, 224, 64) if tiny else (4096, 14336, 65536)
        return MLPBlock(hidden, inner), {"x": torch.randn(tokens, hidden)}
    raise SystemExit(f"unknown model {name!r}")


def _to(batch: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def _call(model: nn.Module, batch: dict):
    if isinstance(model, MLPBlock):
        return model(batch["x"])
    return model(**batch)


@torch.no_grad()
def time_arms(arms: dict[str, nn.Module], batch: dict, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    """ms per forward pass of each arm, per round (arms interleaved, order reversed every other round)."""
    for model in arms.values():
        for _ in range(warmup):
            _call(model, batch)
    common._sync()
    names = list(arms)
    per_round: dict[str, list[float]] = {a: [] for a in names}
    for r in range(rounds):
        for arm in names if r % 2 == 0 else list(reversed(names)):
            start = common._mark()
            for _ in range(iters):
                _call(arms[arm], batch)
            end = common._mark()
            common._sync()
            per_round[arm].append(common._elapsed_ms(start, end) / iters)
    return per_round


def run_model(name: str, opts) -> dict:
    device = "cuda" if CUDA else "cpu"
    model, batch = build(name, opts.tiny)
    t0 = time.perf_counter()
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))  # the project's own 2:4 masks, every Linear
    prune_s = time.perf_counter() - t0
    model = model.to(device, torch.bfloat16).eval()
    batch = _to(batch, device, torch.bfloat16)
    arms: dict[str, nn.Module] = {"dense": model}
    reports = {}
    timer = None if CUDA else (lambda n, d, s: (1.0, 1.0))  # CPU smoke run: the dispatch path, no real timing
    convert = None if CUDA else (lambda w, x: w.detach().clone())
    algs = {} if opts.alg_ids is None else dict(alg_ids=opts.alg_ids)
    variants = [
        ("dispatch", dict(min_speedup=opts.min_speedup, **algs)),
        ("all_sparse", dict(min_speedup=0.0, **algs)),
    ]
    for arm, kwargs in variants:
        copy_ = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = sparse_inference(copy_, batch, timer=timer, convert=convert, **kwargs)
        reports[arm] = dict(report.to_dict(), dispatch_s=round(time.perf_counter() - t0, 3))
        arms[arm] = copy_
    with torch.no_grad():  # every arm computes the same function (bf16 rounding aside)
        ref = _call(model, batch)
        ref = ref if isinstance(ref, torch.Tensor) else ref.last_hidden_state
        errors = {}
        for arm, m in arms.items():
            out = _call(m, batch)
            out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
            errors[arm] = float((out.float() - ref.float()).norm() / ref.float().norm())
    per_round = time_arms(arms, batch, opts.rounds, opts.iters, opts.warmup)
    result = {
        "model": name,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "masked_tensors": len(masks),
        "prune_s": round(prune_s, 3),
        "relative_output_error": errors,
        "ms": {a: common._stats(v) for a, v in per_round.items()},
        "speedup_vs_dense": {
            a: common._stats([d / x for d, x in zip(per_round["dense"], per_round[a])]) for a in per_round
        },
        "dispatch": reports,
    }
    del arms, model
    common._reset_memory()
    return result


def print_result(r: dict) -> None:
    print(f"\n{r['model']}  batch {r['batch']}  ({r['masked_tensors']} tensors 2:4)")
    print(f"  {'arm':16s} {'ms/forward':>10s} {'x dense':>8s}  {'IQR':>13s}  converted   rel. error")
    for arm, ms in r["ms"].items():
        s = r["speedup_vs_dense"][arm]
        conv = r["dispatch"].get(arm, {}).get("converted")
        n_layers = len(r["dispatch"].get(arm, {}).get("layers", [])) or ""
        conv_text = "" if conv is None else f"{len(conv)}/{n_layers}"
        print(
            f"  {arm:16s} {ms['median']:10.3f} {s['median']:8.3f}  {s['q1']:.3f}-{s['q3']:.3f}  {conv_text:>9s}"
            f"   {r['relative_output_error'][arm]:.2e}"
        )
    dispatch = r["dispatch"].get("dispatch")
    if dispatch:
        shapes: dict[tuple, list] = {}
        for layer in dispatch["layers"]:
            if layer["dense_ms"] is not None:
                key = (tuple(layer["shape"]), tuple(layer["input_shape"]))
                shapes.setdefault(key, []).append(layer)
        for (shape, inp), layers in shapes.items():
            speed = sorted(x["speedup"] for x in layers)
            chosen = sum(x["chosen"] == "sparse" for x in layers)
            kernels = sorted({x["kernel"] for x in layers if x.get("kernel")})
            print(
                f"    weight {'x'.join(map(str, shape)):>11s} input {'x'.join(map(str, inp)):>14s}: {len(layers):3d} "
                f"layers, per-layer sparse speedup median {speed[len(speed) // 2]:.2f} (min {speed[0]:.2f}, max "
                f"{speed[-1]:.2f}), {chosen} converted, fastest kernel {', '.join(kernels)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,bert-large,vit-b16,mlp")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5, help="forward passes per arm per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-speedup", type=float, default=1.05)
    parser.add_argument("--alg-ids", type=int, nargs="*", help="cuSPARSELt ids sparse_inference tries (its default)")
    parser.add_argument("--json", help="write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="tiny models, CPU allowed: a smoke run, not a measurement")
    opts = parser.parse_args()
    if not CUDA and not opts.tiny:
        raise SystemExit("this benchmark times CUDA kernels: run it on a GPU machine (or pass --tiny)")
    import transformers

    versions = {
        "device": torch.cuda.get_device_name() if CUDA else "CPU smoke run",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cusparselt": (
            torch.backends.cusparselt.version() if CUDA and torch.backends.cusparselt.is_available() else None
        ),
    }
    print(versions, flush=True)
    results = {"versions": versions, "options": vars(opts), "models": []}
    for name in opts.models.split(","):
        result = run_model(name, opts)
        print_result(result)
        results["models"].append(result)
        if opts.json:  # written after every model: a crash later keeps what was measured
            with open(opts.json, "w") as fh:
                json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
