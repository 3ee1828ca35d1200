"""Cost of keeping a model sparse during training: plain Trainer vs TicketTrainer vs torch's own masking tools.

Arms, all on the same BERT-base-sized model built from a config (no download), batch 32, sequence 128, bf16:
  dense        plain `transformers.Trainer` (no masks: the baseline)
  ticket       `TicketTrainer` with 90% global magnitude masks on every Linear weight
  ticket_foreach  the same with the Triton kernel switched off (HF_TICKETS_DISABLE_TRITON=1): foreach multiply
  prune        plain Trainer on a model masked with `torch.nn.utils.prune.custom_from_mask` (mask applied every forward)
  parametrize  plain Trainer with a `torch.nn.utils.parametrize` masking parametrization

The arms are interleaved (round-robin, several rounds) because identical runs on a shared GPU vary by ~10%; each
step is timed on the GPU with CUDA events (on_step_begin -> on_step_end), warm-up steps dropped, and each arm's peak
memory is measured alone (everything of the previous arm freed first). Prints per-arm median step time, the ratio
to `dense` (median over rounds, with min-max spread) and the peak-memory ratio.

    python benchmarks/enforcement_overhead.py --rounds 5 --steps 60 --warmup 10
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


class StepTimer(TrainerCallback):
    """Records one CUDA event pair per optimizer step (no host sync until the end); host clock on CPU smoke runs."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.events: list[list] = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append([self._mark(), None])

    def on_step_end(self, args, state, control, **kwargs):
        self.events[-1][1] = self._mark()

    def times_ms(self) -> list[float]:
        if not self.cuda:
            return [(e - s) * 1e3 for s, e in self.events if e is not None]
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in self.events if e is not None]


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


class EnforcementTimer:
    """Wraps a MaskSet's two enforcement calls with CUDA events: the GPU time the masks cost, step by step."""

    def __init__(self, masks) -> None:
        self.pairs: list[list] = []
        for name in ("mask_grads_", "apply_"):
            original = getattr(masks, name)

            def timed(model, _original=original):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = _original(model)
                end.record()
                self.pairs.append([start, end])
                return out

            setattr(masks, name, timed)

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs)


def build_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(MODEL_CONFIG)


def _reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def run_arm(arm: str, masks, args_kwargs: dict, dataset, steps: int) -> tuple[list[float], int, int, float]:
    """Train one arm; return per-step GPU times, peak bytes, mask violations, enforcement GPU ms per step."""
    _reset_memory()
    model = build_model(0)
    sparsity_config = SparsityConfig(method="magnitude", sparsity=0.9, scope="global")
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
    os.environ["HF_TICKETS_DISABLE_TRITON"] = "1" if arm == "ticket_foreach" else "0"
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, **args_kwargs)
        if arm.startswith("ticket"):
            trainer = TicketTrainer(
                model=model, args=args, train_dataset=dataset, masks=masks.clone(), sparsity_config=sparsity_config,
                callbacks=[timer],
            )
        else:
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
        enforcement = EnforcementTimer(trainer.masks) if arm.startswith("ticket") and torch.cuda.is_available() else None
        trainer.train()
        times = timer.times_ms()
        enforce_ms = enforcement.total_ms() / steps if enforcement is not None else 0.0
        peak = _peak_memory()
        violations = trainer.masks.count_violations(model) if arm.startswith("ticket") else 0
    del trainer, model
    return times, peak, violations, enforce_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--arms", default="dense,ticket,ticket_foreach,prune,parametrize")
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU allowed: a smoke run, not a measurement")
    opts = parser.parse_args()
    global MODEL_CONFIG
    if opts.tiny:
        MODEL_CONFIG = BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
        )
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA steps: run it on a GPU machine (or pass --tiny for a smoke run)")

    arms = opts.arms.split(",")
    reference = build_model(0)
    t0 = time.perf_counter()
    masks = apply_sparsity(reference, SparsityConfig(method="magnitude", sparsity=0.9, scope="global"))
    print(f"masks: {len(masks)} tensors, sparsity {masks.sparsity():.4f}, computed in {time.perf_counter() - t0:.1f}s")
    del reference
    dataset = RandomTokens(opts.batch_size * opts.steps, opts.seq_len, MODEL_CONFIG.vocab_size)
    args_kwargs = dict(
        per_device_train_batch_size=opts.batch_size, bf16=torch.cuda.is_available(), learning_rate=1e-4, weight_decay=0.01,
        report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=10_000, seed=0,
        dataloader_num_workers=2,
    )

    medians: dict[str, list[float]] = {a: [] for a in arms}
    peaks: dict[str, list[int]] = {a: [] for a in arms}
    enforce: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(opts.rounds):
        order = arms if r % 2 == 0 else list(reversed(arms))  # alternate order so no arm always runs first
        for arm in order:
            times, peak, violations, enforce_ms = run_arm(arm, masks, args_kwargs, dataset, opts.steps)
            medians[arm].append(statistics.median(times[opts.warmup :]))
            peaks[arm].append(peak)
            enforce[arm].append(enforce_ms)
            if violations:
                raise SystemExit(f"{arm}: {violations} masked weights are not zero")
            print(
                f"round {r} {arm:14s} median step {medians[arm][-1]:7.2f} ms  peak {peak / 2**20:8.0f} MiB"
                f"  enforcement {enforce_ms:.3f} ms/step", flush=True,
            )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU smoke run"
    print(f"\n{device}, torch {torch.__version__}, batch {opts.batch_size}, seq {opts.seq_len}, "
          f"bf16, {opts.rounds} rounds x {opts.steps - opts.warmup} timed steps")
    print(f"{'arm':14s} {'step ms (median)':>16s} {'time ratio':>10s} {'spread (min-max)':>18s} {'peak MiB':>9s} {'mem ratio':>9s}")
    results = {}
    for arm in arms:
        ratios = [a / d for a, d in zip(medians[arm], medians["dense"])]
        mem = statistics.median(peaks[arm]) / max(statistics.median(peaks["dense"]), 1)
        results[arm] = {
            "step_ms": medians[arm], "time_ratio_median": statistics.median(ratios), "time_ratio_min": min(ratios),
            "time_ratio_max": max(ratios), "peak_bytes": peaks[arm], "mem_ratio": mem,
            "enforcement_ms_per_step": enforce[arm],
        }
        print(f"{arm:14s} {statistics.median(medians[arm]):16.2f} {statistics.median(ratios):10.3f} "
              f"{min(ratios):8.3f}-{max(ratios):<8.3f} {statistics.median(peaks[arm]) / 2**20:9.0f} {mem:9.3f}")
    for arm in arms:
        if arm.startswith("ticket") and any(enforce[arm]):
            share = statistics.median(e / m for e, m in zip(enforce[arm], medians[arm]))
            print(f"{arm}: masking costs {statistics.median(enforce[arm]):.3f} ms of GPU time per step = {share:.2%} of its step")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
