"""Which 2:4 kernel serves the large MLP block fastest: PyTorch's semi-structured variants against dense, per layer.

`sparse_inference` converts a Linear with `to_sparse_semi_structured` (cuSPARSELt, default algorithm, result
transposed after the matmul). On the H200 that made the 4096 -> 14336 projection 1.31x faster at 65536 tokens but
the 14336 -> 4096 one only 1.07x, and the block 1.24x (docs/nm.md). This script times, for each Linear of the block
at the serving shape, every variant PyTorch offers without cuSPARSELt's algorithm search (which crashed in float16
and returned refused ids in bfloat16):

  dense        `F.linear(x, w, b)` on the pruned weight
  cslt         `to_sparse_semi_structured(w)`: cuSPARSELt, algorithm 0, transpose after the matmul (what
               `sparse_inference` uses today)
  cslt_fused   cuSPARSELt with the transpose fused into the matmul (`SparseSemiStructuredTensor._FUSE_TRANSPOSE`)
  cslt_algK    cuSPARSELt with algorithm id K set by hand (`--alg-ids`; an id the library refuses is reported)
  cutlass      PyTorch's CUTLASS 2:4 kernels (`SparseSemiStructuredTensorCUTLASS`)

and then the whole block with each variant on both layers and with the fastest variant per layer.

`--context` adds the down projection on the input it gets in the sparse block: the GELU of a cuSPARSELt result,
which is transposed in memory ([tokens, 14336] with strides (1, tokens)). There it times cuSPARSELt with each of
`--context-alg-ids` on that layout as it is, and on a row-major copy of it made three ways (PyTorch's
`x.contiguous()`, `hf_tickets.row_major`'s tiled Triton transpose, and `torch.compile`'s code for `x.contiguous()`),
each copy alone too, and the block with the row-major copy before the down projection. Arms are
interleaved (order reversed every other round) and timed with CUDA events; ratios are dense ms / arm ms, the
median over rounds with the IQR. Every sparse output is checked against dense before it is timed.

    PYTHONPATH=. python3 benchmarks/nm_mlp_kernels.py --json mlp_kernels.json
    PYTHONPATH=. python3 benchmarks/nm_mlp_kernels.py --alg-ids 1 2 3 --json mlp_algs.json   # a refused id may crash
    PYTHONPATH=. python3 benchmarks/nm_mlp_kernels.py --alg-ids 1 --context --json mlp_context.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enforcement_overhead as common  # noqa: E402  (CUDA-event marks and the ratio statistics)

from hf_tickets import SparsityConfig, apply_sparsity  # noqa: E402
from hf_tickets.row_major import row_major  # noqa: E402

Linear = Callable[[torch.Tensor], torch.Tensor]


def converters(alg_ids: list[int]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> function turning a 2:4 dense weight into the sparse weight `F.linear` takes."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    def fused(w: torch.Tensor) -> torch.Tensor:
        previous = SparseSemiStructuredTensor._FUSE_TRANSPOSE
        SparseSemiStructuredTensor._FUSE_TRANSPOSE = True
        try:
            return SparseSemiStructuredTensorCUSPARSELT.from_dense(w)
        finally:
            SparseSemiStructuredTensor._FUSE_TRANSPOSE = previous

    def with_alg(alg: int, fuse: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def convert(w: torch.Tensor) -> torch.Tensor:
            sw = fused(w) if fuse else SparseSemiStructuredTensorCUSPARSELT.from_dense(w)
            sw.alg_id_cusparselt = alg
            return sw

        return convert

    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "cslt": to_sparse_semi_structured,
        "cslt_fused": fused,
        "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense,
    }
    for alg in alg_ids:
        if alg:
            out[f"cslt_alg{alg}"] = with_alg(alg, fuse=False)
            out[f"cslt_fused_alg{alg}"] = with_alg(alg, fuse=True)
    return out


@torch.no_grad()
def time_fns(fns: dict[str, Callable[[], torch.Tensor]], rounds: int, iters: int, warmup: int) -> dict[str, list]:
    """ms per call of each function, per round: interleaved, order reversed every other round, CUDA events."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    common._sync()
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = common._mark()
            for _ in range(iters):
                fns[name]()
            end = common._mark()
            common._sync()
            out[name].append(common._elapsed_ms(start, end) / iters)
    return out


def print_timed(title: str, timed: dict[str, dict], refused: Optional[dict[str, str]] = None) -> None:
    print(f"\n{title}")
    for name, row in timed.items():
        s = row["speedup"]
        print(f"  {name:28s} {row['ms']['median']:8.3f} ms  {s['median']:.3f}x ({s['q1']:.3f}-{s['q3']:.3f})")
    for name, why in (refused or {}).items():
        print(f"  {name:28s} refused: {why}")


def cslt(w: torch.Tensor, alg: int) -> torch.Tensor:
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUSPARSELT

    sw = SparseSemiStructuredTensorCUSPARSELT.from_dense(w.detach().contiguous())
    sw.alg_id_cusparselt = alg
    return sw


@torch.no_grad()
def context_section(opts, x: torch.Tensor, up: nn.Linear, down: nn.Linear) -> dict:
    """The down projection on the transposed input the sparse block hands it, as it is and copied to row-major."""
    up_sparse = cslt(up.weight, 1 if 1 in opts.context_alg_ids else 0)
    h = nn.functional.gelu(nn.functional.linear(x, up_sparse, up.bias))
    layout = {"shape": list(h.shape), "stride": list(h.stride())}
    copies: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"contiguous": torch.Tensor.contiguous}
    copies["row_major"] = row_major
    try:
        compiled = torch.compile(lambda t: t.contiguous(), dynamic=False)
        compiled(h)
        copies["compiled"] = compiled
    except Exception as exc:  # noqa: BLE001 - no compiler here is a result
        print(f"torch.compile refused: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    for name, copy in copies.items():
        if not torch.equal(copy(h), h.contiguous()):
            raise SystemExit(f"{name} copy differs from x.contiguous()")
    ref = nn.functional.linear(h, down.weight, down.bias).float()
    fns: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: nn.functional.linear(h, down.weight, down.bias)}
    refused: dict[str, str] = {}
    for alg in opts.context_alg_ids:
        try:
            sw = cslt(down.weight, alg)
            err = float((nn.functional.linear(h, sw, down.bias).float() - ref).norm() / ref.norm())
            if err > 2e-2:
                refused[f"alg{alg}"] = f"output differs from dense (relative error {err:.3g})"
                continue
        except Exception as exc:  # noqa: BLE001
            refused[f"alg{alg}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        fns[f"alg{alg}_as_is"] = lambda sw=sw: nn.functional.linear(h, sw, down.bias)
        for name, copy in copies.items():
            fns[f"alg{alg}_{name}"] = lambda sw=sw, copy=copy: nn.functional.linear(copy(h), sw, down.bias)
    for name, copy in copies.items():  # the copy alone, against the dense layer's time
        fns[f"copy_{name}"] = lambda copy=copy: copy(h)
    down_timed = ratios(time_fns(fns, opts.rounds, opts.iters, opts.warmup))
    print_timed(f"down on its in-context input {layout}", down_timed, refused)

    down_alg = max(
        (n for n in down_timed if n.startswith("alg")), key=lambda n: down_timed[n]["speedup"]["median"], default=None
    )
    block: dict[str, Callable[[], torch.Tensor]] = {
        "dense": lambda: nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(x, up.weight, up.bias)), down.weight, down.bias
        )
    }
    for alg in sorted({int(n[3:].split("_")[0]) for n in down_timed if n.startswith("alg")}):
        sw = cslt(down.weight, alg)
        for name, copy in {"as_is": lambda t: t, **copies}.items():
            block[f"alg{alg}_{name}"] = lambda sw=sw, copy=copy: nn.functional.linear(
                copy(nn.functional.gelu(nn.functional.linear(x, up_sparse, up.bias))), sw, down.bias
            )
    block_timed = ratios(time_fns(block, opts.rounds, opts.iters, opts.warmup))
    print_timed("MLP block, up on cuSPARSELt, down per arm (the layout change inside the timing)", block_timed)
    return {"layout": layout, "down": down_timed, "refused": refused, "best_down": down_alg, "block": block_timed}


def ratios(per_round: dict[str, list[float]]) -> dict[str, dict]:
    dense = per_round["dense"]
    return {
        name: {"ms": common._stats(v), "speedup": common._stats([d / x for d, x in zip(dense, v)])}
        for name, v in per_round.items()
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inner", type=int, default=14336)
    parser.add_argument("--alg-ids", type=int, nargs="*", default=[])
    parser.add_argument("--context", action="store_true", help="the down projection on its in-context layout")
    parser.add_argument("--context-alg-ids", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--skip-layers", action="store_true", help="only the --context section")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU with 2:4 sparse tensor cores (cuSPARSELt)")
    torch.manual_seed(0)
    up, down = nn.Linear(opts.hidden, opts.inner), nn.Linear(opts.inner, opts.hidden)
    block = nn.Sequential(up, nn.GELU(), down)
    apply_sparsity(block, SparsityConfig(pattern="2:4"))
    block = block.to("cuda", torch.bfloat16).eval()
    x = torch.randn(opts.tokens, opts.hidden, device="cuda", dtype=torch.bfloat16)
    h = nn.functional.gelu(up(x))
    inputs = {"up": x, "down": h}
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": vars(opts), "layers": {}}
    if opts.context:
        result["context"] = context_section(opts, x, up, down)
    if opts.skip_layers:
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return
    sparse: dict[str, dict[str, torch.Tensor]] = {"up": {}, "down": {}}
    for layer_name, layer in (("up", up), ("down", down)):
        inp = inputs[layer_name]
        ref = nn.functional.linear(inp, layer.weight, layer.bias).float()
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "dense": lambda inp=inp, layer=layer: nn.functional.linear(inp, layer.weight, layer.bias)
        }
        errors: dict[str, str] = {}
        for name, convert in converters(opts.alg_ids).items():
            try:
                sw = convert(layer.weight.detach().contiguous())
                out = nn.functional.linear(inp, sw, layer.bias).float()
                err = float((out - ref).norm() / ref.norm())
                if err > 2e-2:
                    errors[name] = f"output differs from dense (relative error {err:.3g})"
                    continue
            except Exception as exc:  # noqa: BLE001 - a variant this torch or GPU refuses is a result, not a crash
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            sparse[layer_name][name] = sw
            fns[name] = lambda inp=inp, sw=sw, layer=layer: nn.functional.linear(inp, sw, layer.bias)
        timed = ratios(time_fns(fns, opts.rounds, opts.iters, opts.warmup))
        result["layers"][layer_name] = {"weight": list(layer.weight.shape), "timed": timed, "refused": errors}
        print(f"\n{layer_name}: weight {tuple(layer.weight.shape)}, input {tuple(inp.shape)}")
        for name, row in timed.items():
            s = row["speedup"]
            print(f"  {name:20s} {row['ms']['median']:8.3f} ms  {s['median']:.3f}x ({s['q1']:.3f}-{s['q3']:.3f})")
        for name, why in errors.items():
            print(f"  {name:20s} refused: {why}")

    def best(layer_name: str) -> Optional[str]:
        timed = result["layers"][layer_name]["timed"]
        name = max(timed, key=lambda n: timed[n]["speedup"]["median"])
        return None if name == "dense" else name

    def block_fn(up_w: Optional[torch.Tensor], down_w: Optional[torch.Tensor]) -> Callable[[], torch.Tensor]:
        uw = up.weight if up_w is None else up_w
        dw = down.weight if down_w is None else down_w
        return lambda: nn.functional.linear(nn.functional.gelu(nn.functional.linear(x, uw, up.bias)), dw, down.bias)

    arms = {"dense": block_fn(None, None)}
    for name in sparse["up"]:
        if name in sparse["down"]:
            arms[name] = block_fn(sparse["up"][name], sparse["down"][name])
    picks = {"up": best("up"), "down": best("down")}
    arms["fastest_per_layer"] = block_fn(
        sparse["up"].get(picks["up"]) if picks["up"] else None,
        sparse["down"].get(picks["down"]) if picks["down"] else None,
    )
    timed = ratios(time_fns(arms, opts.rounds, opts.iters, opts.warmup))
    result["block"] = {"timed": timed, "fastest_per_layer": picks}
    print(f"\nMLP block {opts.hidden} -> {opts.inner} -> {opts.hidden}, {opts.tokens} tokens, bf16 (picks: {picks})")
    for name, row in timed.items():
        s = row["speedup"]
        print(f"  {name:20s} {row['ms']['median']:8.3f} ms  {s['median']:.3f}x ({s['q1']:.3f}-{s['q3']:.3f})")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
