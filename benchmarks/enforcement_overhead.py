"""Cost of keeping a model sparse during training: plain Trainer vs TicketTrainer vs torch's own masking tools.

Arms, all on the same BERT-base-sized model built from a config (no download), batch 32, sequence 128, bf16:
  dense        plain `transformers.Trainer` (no masks: the baseline)
  ticket       `TicketTrainer` with 90% global magnitude masks on every Linear weight
  ticket_foreach  the same with the Triton kernel switched off (HF_TICKETS_DISABLE_TRITON=1): foreach multiply
  prune        plain Trainer, model masked with `torch.nn.utils.prune.custom_from_mask` (mask applied every forward)
  parametrize  plain Trainer with a `torch.nn.utils.parametrize` masking parametrization

Peak memory is measured first, each arm alone (everything of the previous arm freed). Then all arms stay resident
and take turns in short rounds, because identical runs on a shared GPU drift by ~10% over minutes; each step is
timed on the GPU with CUDA events (on_step_begin -> on_step_end) and warm-up steps are dropped. Prints per-arm
median step time, the ratio to `dense` (median of per-round ratios, with IQR and min-max), the peak-memory ratio,
and the GPU time of the masking calls themselves (CUDA events around them) as a share of the step.

    python benchmarks/enforcement_overhead.py --rounds 15 --steps 30 --warmup 5
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


def build_arm(arm: str, masks, args_kwargs: dict, dataset, steps: int, out: str):
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
    timer = StepTimer()
    args = TrainingArguments(out, max_steps=steps, **args_kwargs)
    if arm.startswith("ticket"):
        config = SparsityConfig(method="magnitude", sparsity=0.9, scope="global")
        trainer = TicketTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            masks=masks.clone(),
            sparsity_config=config,
            callbacks=[timer],
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    return trainer, timer


def train_once(arm: str, trainer, timer: StepTimer) -> list[float]:
    """One short train() call; the Triton switch is read when the masks bind to the GPU (the first call)."""
    os.environ["HF_TICKETS_DISABLE_TRITON"] = "1" if arm == "ticket_foreach" else "0"
    timer.events.clear()
    trainer.train()
    return timer.times_ms()


def measure_memory(arm: str, masks, args_kwargs: dict, dataset, steps: int) -> tuple[int, int]:
    """Peak memory of one arm alone (everything else freed first) and its mask violations afterwards."""
    _reset_memory()
    with tempfile.TemporaryDirectory() as out:
        trainer, timer = build_arm(arm, masks, args_kwargs, dataset, steps, out)
        train_once(arm, trainer, timer)
        peak = _peak_memory()
        violations = trainer.masks.count_violations(trainer.model) if arm.startswith("ticket") else 0
    del trainer
    _reset_memory()
    return peak, violations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=30, help="steps per arm per round")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--arms", default="dense,ticket,ticket_foreach,prune,parametrize")
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
        per_device_train_batch_size=opts.batch_size,
        bf16=torch.cuda.is_available(),
        learning_rate=1e-4,
        weight_decay=0.01,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=10_000,
        seed=0,
        dataloader_num_workers=2,
    )

    # Phase 1: peak memory, each arm alone.
    peaks, violations = {}, {}
    for arm in arms:
        peaks[arm], violations[arm] = measure_memory(arm, masks, args_kwargs, dataset, opts.steps)
        print(f"memory {arm:14s} peak {peaks[arm] / 2**20:8.0f} MiB  violations {violations[arm]}", flush=True)
        if violations[arm]:
            raise SystemExit(f"{arm}: {violations[arm]} masked weights are not zero")

    # Phase 2: step time, all arms resident, interleaved in short rounds (drift on a shared GPU hits all arms).
    tmp = tempfile.TemporaryDirectory()
    built = {arm: build_arm(arm, masks, args_kwargs, dataset, opts.steps, os.path.join(tmp.name, arm)) for arm in arms}
    enforcement = {
        arm: EnforcementTimer(built[arm][0].masks)
        for arm in arms
        if arm.startswith("ticket") and torch.cuda.is_available()
    }
    medians: dict[str, list[float]] = {a: [] for a in arms}
    enforce: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(opts.rounds):
        order = arms if r % 2 == 0 else list(reversed(arms))  # alternate order so no arm always runs first
        for arm in order:
            if arm in enforcement:
                enforcement[arm].pairs.clear()
            times = train_once(arm, *built[arm])
            medians[arm].append(statistics.median(times[opts.warmup :]))
            if arm in enforcement:
                enforce[arm].append(enforcement[arm].total_ms() / len(times))
        print(f"round {r:2d} " + "  ".join(f"{a} {medians[a][-1]:6.2f}" for a in arms), flush=True)
    for arm in arms:
        if arm.startswith("ticket"):
            trainer = built[arm][0]
            bad = trainer.masks.count_violations(trainer.model)
            if bad:
                raise SystemExit(f"{arm}: {bad} masked weights are not zero after timing")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU smoke run"
    print(
        f"\n{device}, torch {torch.__version__}, batch {opts.batch_size}, seq {opts.seq_len}, bf16, "
        f"{opts.rounds} interleaved rounds x {opts.steps - opts.warmup} timed steps per arm"
    )
    print(
        f"{'arm':14s} {'step ms (median)':>16s} {'time ratio':>10s} {'IQR of ratio':>16s} {'min-max':>14s} "
        f"{'peak MiB':>9s} {'mem ratio':>9s}"
    )
    results = {}
    for arm in arms:
        ratios = sorted(a / d for a, d in zip(medians[arm], medians["dense"]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        mem = peaks[arm] / max(peaks["dense"], 1)
        results[arm] = {
            "step_ms": medians[arm],
            "time_ratio_median": statistics.median(ratios),
            "time_ratio_q1": q1,
            "time_ratio_q3": q3,
            "time_ratio_min": ratios[0],
            "time_ratio_max": ratios[-1],
            "peak_bytes": peaks[arm],
            "mem_ratio": mem,
            "enforcement_ms_per_step": enforce[arm],
        }
        print(
            f"{arm:14s} {statistics.median(medians[arm]):16.2f} {statistics.median(ratios):10.3f} "
            f"{q1:7.3f}-{q3:<8.3f} {ratios[0]:6.3f}-{ratios[-1]:<7.3f} {peaks[arm] / 2**20:9.0f} {mem:9.3f}"
        )
    for arm in arms:
        if enforce[arm]:
            share = statistics.median(e / m for e, m in zip(enforce[arm], medians[arm]))
            print(
                f"{arm}: masking grads + weights costs {statistics.median(enforce[arm]):.3f} ms of GPU time per step "
                f"= {share:.2%} of the step"
            )
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=2)
    tmp.cleanup()


if __name__ == "__main__":
    main()
