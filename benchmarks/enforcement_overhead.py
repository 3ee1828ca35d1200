"""Cost of keeping a model sparse during training: the masking work itself, and TicketTrainer vs plain Trainer.

Model: a BERT-base-sized `BertForSequenceClassification` built from a config (no download), 90% global magnitude
masks on every Linear weight, batch 32, sequence 128, bf16 autocast (fp32 weights and gradients).

Part 1, the masking kernels alone (CUDA only; `--kernel-iters 0` skips it). One `MaskEnforcer` on the model on the
GPU, random gradients with NaN and inf in them. Times `mask_grads_` and `mask_weights_` with CUDA events, for the
kernel (default write policy, and HF_TICKETS_STRICT_WRITES=1) and the masked_fill_ fallback: (a) queued back to
back (pure GPU time) and (b) one call at a time after a device synchronize (what a call costs when the GPU waits
for it, host work included, as in Trainer, which synchronizes on the loss before the optimizer step). Also a call
whose gradients sit at new addresses every time (offset table rebuilt), a large device-to-device copy (the
bandwidth ceiling), and the byte floor of the job.

Part 2, whole training steps, arms:
  dense           plain `transformers.Trainer` (no masks: the baseline)
  ticket          `TicketTrainer` with the masks (the Triton kernel on CUDA)
  ticket_foreach  the same with the kernel switched off (HF_TICKETS_DISABLE_TRITON=1): masked_fill_ per tensor
  ticket_strict   the kernel with write-only stores for every dtype (HF_TICKETS_STRICT_WRITES=1)
  prune           plain Trainer, `torch.nn.utils.prune.custom_from_mask` (mask applied every forward)
  parametrize     plain Trainer with a `torch.nn.utils.parametrize` masking parametrization
  ticket_2_4      `TicketTrainer` with fixed 2:4 magnitude masks on every Linear weight (the ASP recipe, issue 12)
  sr_ste          `TicketTrainer` with `method="sr_ste"` (dense weights kept, N:M mask recomputed every step)
Peak memory is measured first, each arm alone. Then all arms stay resident and take turns in short rounds (order
reversed every other round), because identical runs on a shared GPU drift over minutes. Every step is timed with
CUDA events (on_step_begin -> on_step_end), and `MaskEnforcer.mask_grads_` / `mask_weights_` are wrapped at class
level with CUDA events, so the masking work of each step is measured directly. Warm-up steps are dropped. Prints
per arm the median step time, the ratio to `dense` (median of per-round ratios, IQR and min-max), peak memory, and
the masking ms per step and its share of the step.

    PYTHONPATH=. python3 benchmarks/enforcement_overhead.py --rounds 15 --steps 40 --warmup 5 \\
        --arms dense,ticket,ticket_strict,ticket_foreach --json docs/results/enforcement_overhead_h200.json
    PYTHONPATH=. python3 benchmarks/enforcement_overhead.py --rounds 0 --policy-sweep  # the kernels alone
    python benchmarks/enforcement_overhead.py --tiny        # CPU smoke run of the script, not a measurement
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_tickets import SparsityConfig, TicketTrainer, apply_sparsity
from hf_tickets.enforce import MaskEnforcer, count_violations

CUDA = torch.cuda.is_available()


def _mark():
    """A point on the GPU timeline (a recorded CUDA event), or the host clock on CPU smoke runs."""
    if not CUDA:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_ms(start, end) -> float:
    return (end - start) * 1e3 if not CUDA else start.elapsed_time(end)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class MaskingTimer:
    """Wraps `MaskEnforcer.mask_grads_` and `mask_weights_` at class level with CUDA events.

    Records only inside a training step (between `StepTimer`'s on_step_begin and on_step_end), attributed to that
    step; the weight masking of on_train_begin is left out. Also notes how many offset tables the kernel built.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.pairs: list[tuple[int, str, object, object]] = []
        self.table_builds: dict[int, int] = {}
        self.kernel_in_use: set[bool] = set()  # whether the maskers that ran had the kernel on
        self._originals = {}
        for name in ("mask_grads_", "mask_weights_"):
            original = getattr(MaskEnforcer, name)
            self._originals[name] = original

            def timed(enforcer, *args, _original=original, _name=name, **kwargs):
                if self.step is None:
                    return _original(enforcer, *args, **kwargs)
                start = _mark()
                out = _original(enforcer, *args, **kwargs)
                self.pairs.append((self.step, _name, start, _mark()))
                masker = getattr(enforcer, "_masker", None)
                if masker is not None:
                    self.kernel_in_use.add(bool(getattr(masker, "enabled", False)))
                    builds = getattr(masker, "table_builds", 0)
                    builds += sum(getattr(s, "table_builds", 0) for s in getattr(masker, "_subsets", {}).values())
                    self.table_builds[id(masker)] = builds
                return out

            setattr(MaskEnforcer, name, timed)

    def per_step_ms(self) -> dict[int, float]:
        _sync()
        out: dict[int, float] = {}
        for step, _, start, end in self.pairs:
            out[step] = out.get(step, 0.0) + _elapsed_ms(start, end)
        return out

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(MaskEnforcer, name, original)


class StepTimer(TrainerCallback):
    """One event pair per optimizer step (no host sync until the end); opens the MaskingTimer's window."""

    def __init__(self, masking: MaskingTimer) -> None:
        self.masking = masking
        self.events: list[list] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append([_mark(), None])
        self.masking.step = len(self.events) - 1

    def on_step_end(self, args, state, control, **kwargs):
        self.events[-1][1] = _mark()
        self.masking.step = None

    def times_ms(self) -> list[float]:
        _sync()
        return [_elapsed_ms(s, e) for s, e in self.events if e is not None]


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class MaskParametrization(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


MODEL_CONFIG = BertConfig(num_labels=2)  # BERT-base sizes; --tiny swaps in a small one for CPU smoke runs
SPARSITY = SparsityConfig(method="magnitude", sparsity=0.9, scope="global")
NM_SPARSITY = SparsityConfig(method="magnitude", pattern="2:4")  # the ticket_2_4 arm: fixed 2:4 masks
_NM_MASKS: dict = {}


def nm_masks():
    """The 2:4 magnitude masks of the seed-0 model (computed once)."""
    if "masks" not in _NM_MASKS:
        _NM_MASKS["masks"] = apply_sparsity(build_model(0), NM_SPARSITY)
    return _NM_MASKS["masks"]


def build_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(MODEL_CONFIG)


def _reset_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    n = len(ordered)
    return {
        "median": statistics.median(ordered),
        "q1": ordered[n // 4],
        "q3": ordered[(3 * n) // 4],
        "min": ordered[0],
        "max": ordered[-1],
        "n": n,
    }


# ---- part 1: the masking kernels alone ----------------------------------------------------------------------------


def _set_kernel(on: bool, strict: bool = False) -> None:
    """Read when a masker is built: the Triton kernel on or off, and its write policy (see hf_tickets/kernels.py)."""
    os.environ["HF_TICKETS_DISABLE_TRITON"] = "0" if on else "1"
    os.environ["HF_TICKETS_STRICT_WRITES"] = "1" if strict else "0"


def _window_ms(call, iters: int) -> tuple[float, float]:
    """Median GPU ms of one call started on an idle GPU (after a synchronize), and median host ms of the call."""
    gpu, host = [], []
    for _ in range(iters):
        _sync()
        start = _mark()
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
        end = _mark()
        _sync()
        gpu.append(_elapsed_ms(start, end))
    return statistics.median(gpu), statistics.median(host)


def _queued_ms(call, iters: int) -> float:
    """GPU ms per call with `iters` calls queued back to back (launch gaps hidden when the GPU is the bottleneck)."""
    call()
    _sync()
    start = _mark()
    for _ in range(iters):
        call()
    end = _mark()
    _sync()
    return _elapsed_ms(start, end) / iters


def _fill_grads(params, g: torch.Generator) -> list[torch.Tensor]:
    """Random gradients with NaN and inf sprinkled in (pruned entries must come out exactly 0 all the same)."""
    grads = []
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(p.device)
        flat = grad.view(-1)
        flat[::97] = float("nan")
        flat[1::89] = float("inf")
        grads.append(grad)
    return grads


def kernel_bench(masks, iters: int) -> dict:
    device = "cuda" if CUDA else "cpu"
    model = build_model(0).to(device)
    named = dict(model.named_parameters())
    params = [named[n] for n in masks]
    keep = [masks[n].to(device) for n in masks]
    g = torch.Generator().manual_seed(1)
    grads = _fill_grads(params, g)
    for p, grad in zip(params, grads):
        p.grad = grad
    masked = sum(m.numel() for m in keep)
    pruned = sum(int((~m).sum()) for m in keep)
    out: dict = {"masked_entries": masked, "pruned_entries": pruned, "tensors": len(keep), "iters": iters}

    # Exactness on this model: gradients and weights against torch.where, bit for bit (NaN/inf in pruned grads).
    results = {}
    for arm, on, strict in (("kernel", True, False), ("kernel_strict", True, True), ("masked_fill", False, False)):
        _set_kernel(on, strict)
        for p, grad in zip(params, _fill_grads(params, torch.Generator().manual_seed(2))):
            p.grad = grad
        want = [torch.where(m, p.grad, torch.zeros((), device=device)) for p, m in zip(params, keep)]
        enforcer = MaskEnforcer(masks, model)
        enforcer.mask_grads_()
        exact = all(
            torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip((p.grad for p in params), want)
        )
        del want
        enforcer.mask_weights_()
        exact = exact and count_violations(model, masks) == 0
        grads_gpu, grads_host = _window_ms(enforcer.mask_grads_, iters)
        weights_gpu, weights_host = _window_ms(enforcer.mask_weights_, iters)
        grads = [p.grad for p in params]
        masker = enforcer._masker
        _, masker_host = _window_ms(lambda m=masker, g=grads: m.zero_pruned_(g), iters)
        results[arm] = {
            "masker_zero_pruned_host_ms": masker_host,
            "exact": bool(exact),
            "kernel_in_use": bool(getattr(enforcer._masker, "enabled", False)),
            "grads_queued_ms": _queued_ms(enforcer.mask_grads_, iters),
            "weights_queued_ms": _queued_ms(enforcer.mask_weights_, iters),
            "grads_window_ms": grads_gpu,
            "grads_host_ms": grads_host,
            "weights_window_ms": weights_gpu,
            "weights_host_ms": weights_host,
        }
        if arm == "kernel":
            # Gradients at new addresses every call (more sets than the masker caches tables for): the cost of a
            # table rebuild, which a Trainer run should not pay after its first steps.
            sets = [_fill_grads(params, g) for _ in range(10)]
            turn = iter(range(10**9))

            def fresh_grads(enforcer=enforcer, sets=sets, turn=turn, params=params):
                for p, grad in zip(params, sets[next(turn) % len(sets)]):
                    p.grad = grad
                enforcer.mask_grads_()

            builds = enforcer._masker.table_builds
            results[arm]["grads_new_addresses_window_ms"], results[arm]["grads_new_addresses_host_ms"] = _window_ms(
                fresh_grads, iters
            )
            results[arm]["table_builds_in_new_address_calls"] = enforcer._masker.table_builds - builds
            del sets
        del enforcer
    _set_kernel(True)
    out.update(results)

    # Ceiling and floor: a large device-to-device copy, and the bytes one pass must move at least.
    if CUDA:
        src = torch.randn(2**28, device=device)  # 1 GiB
        dst = torch.empty_like(src)
        copy_ms = _queued_ms(lambda: dst.copy_(src), 10)
        copy_bw = 2 * src.numel() * 4 / (copy_ms * 1e-3)
        del src, dst
    else:
        copy_bw = float("nan")
    floor_bytes = masked / 8 + 4 * pruned  # 1 mask bit per masked weight read, 4 bytes per pruned fp32 entry written
    out.update(
        copy_bytes_per_s=copy_bw,
        floor_bytes_per_pass=floor_bytes,
        floor_ms_per_pass=floor_bytes / copy_bw * 1e3,
    )
    del model, params, grads
    _reset_memory()
    return out


def policy_sweep(iters: int) -> dict:
    """GPU ms per pass over BERT-base-shaped fp32 and bf16 tensors with random masks of several densities, for the
    two write policies of hf_tickets/kernels.py forced on every block, and the default (chosen per block)."""
    from hf_tickets import kernels

    device = "cuda" if CUDA else "cpu"
    cfg = MODEL_CONFIG
    shapes = [(cfg.hidden_size, cfg.hidden_size)] * 4 + [(cfg.intermediate_size, cfg.hidden_size)] * 2
    shapes = shapes * cfg.num_hidden_layers + [(cfg.hidden_size, cfg.hidden_size), (2, cfg.hidden_size)]
    shapes = [s if i % 6 != 5 else s[::-1] for i, s in enumerate(shapes)]  # output.dense is hidden x intermediate
    g = torch.Generator().manual_seed(0)
    out: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        targets = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
        for density in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7):
            masks = [(torch.rand(s, generator=g) < density).to(device) for s in shapes]
            row = {}
            for policy in ("write_only", "whole", "default"):
                _set_kernel(True, strict=policy == "write_only")
                saved = kernels.REWRITE_KEPT_MAX_DENSITY
                if policy == "whole":
                    kernels.REWRITE_KEPT_MAX_DENSITY = 1.0
                masker = kernels.MultiTensorMasker(masks)
                kernels.REWRITE_KEPT_MAX_DENSITY = saved
                row[policy] = statistics.median(
                    _queued_ms(lambda m=masker, t=targets: m.zero_pruned_(t), iters) for _ in range(3)
                )
            out[f"{str(dtype).split('.')[-1]}/kept{density}"] = row
            print(f"{str(dtype):15s} kept {density:4.2f}  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        del targets
    _set_kernel(True)
    return out


def print_kernel_bench(k: dict) -> None:
    print(
        f"\nmasking kernels alone: {k['tensors']} tensors, {k['masked_entries'] / 1e6:.1f}M masked entries, "
        f"{k['pruned_entries'] / 1e6:.1f}M pruned; D2D copy {k['copy_bytes_per_s'] / 1e12:.2f} TB/s; "
        f"floor per pass {k['floor_bytes_per_pass'] / 1e6:.0f} MB = {k['floor_ms_per_pass']:.3f} ms"
    )
    print(
        f"{'path':13s} {'exact':>5s} {'grads q':>8s} {'weights q':>9s} {'grads win':>9s} {'host':>6s} "
        f"{'weights win':>11s} {'host':>6s}   (ms; q = queued back to back, win = one call on an idle GPU)"
    )
    for arm in ("kernel", "kernel_strict", "masked_fill"):
        r = k[arm]
        print(
            f"{arm:13s} {str(r['exact']):>5s} {r['grads_queued_ms']:8.3f} {r['weights_queued_ms']:9.3f} "
            f"{r['grads_window_ms']:9.3f} {r['grads_host_ms']:6.3f} {r['weights_window_ms']:11.3f} "
            f"{r['weights_host_ms']:6.3f}"
        )
    r = k["kernel"]
    print(
        f"host ms of MultiTensorMasker.zero_pruned_ alone: kernel {r['masker_zero_pruned_host_ms']:.3f}, "
        f"masked_fill {k['masked_fill']['masker_zero_pruned_host_ms']:.3f} (the rest of a call's host time is "
        "MaskEnforcer's)"
    )
    print(
        f"kernel, gradients at new addresses every call: {r['grads_new_addresses_window_ms']:.3f} ms "
        f"(host {r['grads_new_addresses_host_ms']:.3f} ms, {r['table_builds_in_new_address_calls']} table builds)"
    )


# ---- part 2: whole training steps ---------------------------------------------------------------------------------


def build_arm(arm: str, masks, args_kwargs: dict, dataset, steps: int, out: str, masking: MaskingTimer):
    """A trainer for one arm (model built from the same seed, masks applied the arm's way) and its step timer."""
    model = build_model(0)
    modules = dict(model.named_modules())
    if arm in ("prune", "parametrize"):
        for name, mask in masks.items():
            module = modules[name.rsplit(".", 1)[0]]
            if arm == "prune":
                prune.custom_from_mask(module, "weight", mask)
            else:
                with torch.no_grad():
                    module.weight.mul_(mask)
                parametrize.register_parametrization(module, "weight", MaskParametrization(mask.float()))
    timer = StepTimer(masking)
    args = TrainingArguments(out, max_steps=steps, **args_kwargs)
    # The switches are read when the masks bind to the model's parameters, which TicketTrainer may do at once.
    _set_kernel(arm != "ticket_foreach", strict=arm == "ticket_strict")
    if arm == "sr_ste":
        trainer = TicketTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            sparsity_config=SparsityConfig(method="sr_ste"),
            callbacks=[timer],
        )
    elif arm.startswith("ticket"):
        nm = arm == "ticket_2_4"
        trainer = TicketTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            masks=(nm_masks() if nm else masks).clone(),
            sparsity_config=NM_SPARSITY if nm else SPARSITY,
            callbacks=[timer],
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    return trainer, timer


def train_once(arm: str, trainer, timer: StepTimer, masking: MaskingTimer) -> tuple[list[float], dict[int, float]]:
    """One short train() call (the kernel switches set again, in case the masks bind only now)."""
    _set_kernel(arm != "ticket_foreach", strict=arm == "ticket_strict")
    timer.events.clear()
    masking.pairs.clear()
    trainer.train()
    return timer.times_ms(), masking.per_step_ms()


def measure_memory(arm: str, masks, args_kwargs: dict, dataset, steps: int, masking: MaskingTimer) -> tuple[int, int]:
    """Peak memory of one arm alone (everything else freed first) and its mask violations afterwards."""
    _reset_memory()
    with tempfile.TemporaryDirectory() as out:
        trainer, timer = build_arm(arm, masks, args_kwargs, dataset, steps, out, masking)
        train_once(arm, trainer, timer, masking)
        peak = _peak_memory()
        violations = count_violations(trainer.model, trainer.masks) if arm.startswith(("ticket", "sr_ste")) else 0
    del trainer
    _reset_memory()
    return peak, violations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (0: the kernels alone)")
    parser.add_argument("--steps", type=int, default=30, help="steps per arm per round")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--arms", default="dense,ticket,ticket_foreach,prune,parametrize")
    parser.add_argument("--kernel-iters", type=int, default=50, help="timed calls per kernel measurement; 0 skips")
    parser.add_argument(
        "--policy-sweep", action="store_true", help="also time both write policies over mask densities (ms per pass)"
    )
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU allowed: a smoke run, not a measurement")
    opts = parser.parse_args()
    global MODEL_CONFIG
    if opts.tiny:
        MODEL_CONFIG = BertConfig(
            vocab_size=500,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    elif not CUDA:
        raise SystemExit("this benchmark times CUDA steps: run it on a GPU machine (or pass --tiny for a smoke run)")

    arms = opts.arms.split(",")
    if "dense" not in arms:
        raise SystemExit("--arms must include dense (the baseline of every ratio)")
    reference = build_model(0)
    t0 = time.perf_counter()
    masks = apply_sparsity(reference, SPARSITY)
    print(f"masks: {len(masks)} tensors, sparsity {masks.sparsity():.4f}, computed in {time.perf_counter() - t0:.1f}s")
    del reference
    device = torch.cuda.get_device_name() if CUDA else "CPU smoke run"
    import transformers

    versions = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    print(versions, flush=True)
    results: dict = {"versions": versions, "options": vars(opts)}

    if opts.kernel_iters:
        results["kernels"] = kernel_bench(masks, opts.kernel_iters)
        print_kernel_bench(results["kernels"])
        if opts.policy_sweep:
            results["policy_sweep"] = policy_sweep(max(opts.kernel_iters // 2, 1))
    if not opts.rounds:  # the kernels alone
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump(results, fh, indent=2)
        return

    dataset = RandomTokens(opts.batch_size * opts.steps, opts.seq_len, MODEL_CONFIG.vocab_size)
    args_kwargs = dict(
        per_device_train_batch_size=opts.batch_size,
        bf16=CUDA,
        learning_rate=1e-4,
        weight_decay=0.01,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=10_000,
        seed=0,
        dataloader_num_workers=2,
        use_cpu=not CUDA,
    )
    masking = MaskingTimer()

    # Phase 1: peak memory, each arm alone.
    peaks, violations = {}, {}
    for arm in arms:
        peaks[arm], violations[arm] = measure_memory(arm, masks, args_kwargs, dataset, opts.steps, masking)
        print(f"memory {arm:14s} peak {peaks[arm] / 2**20:8.0f} MiB  violations {violations[arm]}", flush=True)
        if violations[arm]:
            raise SystemExit(f"{arm}: {violations[arm]} masked weights are not zero")

    # Phase 2: step time, all arms resident, interleaved in short rounds (drift on a shared GPU hits all arms).
    tmp = tempfile.TemporaryDirectory()
    built = {
        arm: build_arm(arm, masks, args_kwargs, dataset, opts.steps, os.path.join(tmp.name, arm), masking)
        for arm in arms
    }
    step_ms: dict[str, list[float]] = {a: [] for a in arms}  # per round: median step time
    masking_ms: dict[str, list[float]] = {a: [] for a in arms}  # per round: median masking ms per step
    share: dict[str, list[float]] = {a: [] for a in arms}  # per round: median of per-step masking / step
    builds: dict[str, int] = {}
    for r in range(opts.rounds):
        order = arms if r % 2 == 0 else list(reversed(arms))  # alternate order so no arm always runs first
        for arm in order:
            masking.table_builds.clear()
            masking.kernel_in_use.clear()
            times, per_step = train_once(arm, *built[arm], masking)
            if CUDA and arm.startswith("ticket") and masking.kernel_in_use != {arm != "ticket_foreach"}:
                raise SystemExit(
                    f"{arm}: the masks ran with kernel_in_use={masking.kernel_in_use}, not as the arm says"
                )
            timed = range(opts.warmup, len(times))
            step_ms[arm].append(statistics.median(times[i] for i in timed))
            if per_step:
                masking_ms[arm].append(statistics.median(per_step.get(i, 0.0) for i in timed))
                share[arm].append(statistics.median(per_step.get(i, 0.0) / times[i] for i in timed))
                builds[arm] = sum(masking.table_builds.values())
        print(f"round {r:2d} " + "  ".join(f"{a} {step_ms[a][-1]:6.2f}" for a in arms), flush=True)
    masking.restore()
    for arm in arms:
        if arm.startswith("ticket"):
            trainer = built[arm][0]
            bad = count_violations(trainer.model, trainer.masks)
            if bad:
                raise SystemExit(f"{arm}: {bad} masked weights are not zero after timing")

    print(
        f"\n{device}, torch {torch.__version__}, triton {versions['triton']}, transformers "
        f"{versions['transformers']}, batch {opts.batch_size}, seq {opts.seq_len}, bf16={CUDA}, "
        f"{opts.rounds} interleaved rounds x {opts.steps - opts.warmup} timed steps per arm"
    )
    print(
        f"{'arm':14s} {'step ms':>8s} {'ratio':>6s} {'IQR of ratio':>13s} {'min-max':>13s} {'peak MiB':>9s} "
        f"{'mem ratio':>9s} {'masking ms/step':>15s} {'share':>6s}"
    )
    arm_results = {}
    for arm in arms:
        ratios = [a / d for a, d in zip(step_ms[arm], step_ms["dense"])]
        rs = _stats(ratios)
        mem = peaks[arm] / max(peaks["dense"], 1)
        arm_results[arm] = {
            "step_ms_per_round": step_ms[arm],
            "step_ms": _stats(step_ms[arm]),
            "time_ratio": rs,
            "peak_bytes": peaks[arm],
            "mem_ratio": mem,
            "masking_ms_per_step_per_round": masking_ms[arm],
            "masking_ms_per_step": _stats(masking_ms[arm]) if masking_ms[arm] else None,
            "masking_share_per_round": share[arm],
            "masking_share": _stats(share[arm]) if share[arm] else None,
            "offset_table_builds_total": builds.get(arm),
        }
        m = f"{statistics.median(masking_ms[arm]):15.3f} {statistics.median(share[arm]):6.2%}" if share[arm] else ""
        print(
            f"{arm:14s} {statistics.median(step_ms[arm]):8.2f} {rs['median']:6.3f} {rs['q1']:6.3f}-{rs['q3']:<6.3f} "
            f"{rs['min']:6.3f}-{rs['max']:<6.3f} {peaks[arm] / 2**20:9.0f} {mem:9.3f} {m}"
        )
    for arm in arms:
        if masking_ms[arm]:
            ms = _stats(masking_ms[arm])
            print(
                f"{arm}: masking grads + weights {ms['median']:.3f} ms per step (rounds: IQR {ms['q1']:.3f}-"
                f"{ms['q3']:.3f}, min-max {ms['min']:.3f}-{ms['max']:.3f}) = {statistics.median(share[arm]):.2%} "
                f"of the step; offset tables built over the run: {builds.get(arm)}"
            )
    results["arms"] = arm_results
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=2)
    tmp.cleanup()


if __name__ == "__main__":
    main()
