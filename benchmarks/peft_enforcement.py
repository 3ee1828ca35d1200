"""Cost of keeping a frozen sparse base exactly sparse under LoRA (issue 18): TicketTrainer vs plain Trainer.

Model: a MiniLM-shaped `BertForSequenceClassification` built from a config (6 layers, hidden 384, 12 heads, no
download), wrapped with peft LoRA (r=8 on query/key/value/dense, classifier as modules_to_save), the base pruned to
50% per layer by magnitude and frozen. Arms, each its own model built the same way:

  lora_dense        plain `transformers.Trainer` on the LoRA model, no masks (the baseline)
  lora_sparse       `TicketTrainer`, frozen 50% base: the enforcement path skips the frozen weights at every step
  lora_sparse_full  the same, with the per-step weight re-mask forced over every masked weight (what the path did
                    before frozen weights were left out: `mask_weights_(trainable_only=False)`)
  lora_masked       `TicketTrainer` with masked LoRA (ΔW ⊙ M in the forward: one dense [out, in] product per layer)

Arms take turns in rounds (order reversed every other round); every step is timed (on_step_begin -> on_step_end)
and `MaskEnforcer.mask_grads_` / `mask_weights_` are timed inside steps (enforcement_overhead's timers). Prints the
median step time per arm, its ratio to `lora_dense` (median of per-round ratios) and the masking ms per step.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/peft_enforcement.py --rounds 5 --steps 20 \\
        --json docs/results/peft_enforcement_cpu.json
    python benchmarks/peft_enforcement.py --tiny      # smoke run of the script, not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enforcement_overhead as common  # noqa: E402  (step and masking timers, random token data)

from hf_tickets import SparsityConfig, TicketTrainer, apply_sparsity, enable_masked_lora  # noqa: E402
from hf_tickets.enforce import MaskEnforcer, count_violations  # noqa: E402

ARMS = ("lora_dense", "lora_sparse", "lora_sparse_full", "lora_masked")


def build(arm: str, tiny: bool):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if tiny:
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    else:  # all-MiniLM-L6-v2's shape
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = get_peft_model(
        BertForSequenceClassification(cfg),
        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]),
    )
    if arm == "lora_masked":
        enable_masked_lora(model)
    if arm != "lora_dense":
        apply_sparsity(model, SparsityConfig(sparsity=0.5, scope="layerwise", exclude_modules=["classifier"]))
    return model


class FullRemask(MaskEnforcer):
    """The per-step re-mask over every masked weight, frozen ones included (the path before issue 18)."""

    def mask_weights_(self, trainable_only: bool = False) -> None:
        super().mask_weights_(trainable_only=False)


def trainer_for(arm: str, model, data, out: str, steps: int):
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
    )
    if arm == "lora_dense":
        return Trainer(model=model, args=args, train_dataset=data)
    trainer = TicketTrainer(model=model, args=args, train_dataset=data)
    if arm == "lora_sparse_full":
        trainer.sparsity_callback._enforcer = FullRemask(trainer.masks, model)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per arm per round")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of every round")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and 2 rounds of 4 steps (smoke run)")
    a = parser.parse_args()
    if a.tiny:
        a.rounds, a.steps, a.warmup, a.seq = 2, 4, 1, 16
    data = common.RandomTokens(8 * a.steps * 2, a.seq, 30522 if not a.tiny else 100)
    models = {arm: build(arm, a.tiny) for arm in ARMS}
    masking = common.MaskingTimer()
    times: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    mask_ms: dict[str, list[float]] = {arm: [] for arm in ARMS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):
                for arm in ARMS if r % 2 == 0 else reversed(ARMS):
                    trainer = trainer_for(arm, models[arm], data, os.path.join(tmp, arm), a.steps)
                    timer = common.StepTimer(masking)
                    trainer.add_callback(timer)
                    masking.pairs.clear()
                    trainer.train()
                    times[arm].append(timer.times_ms()[a.warmup :])
                    per_step = masking.per_step_ms()
                    mask_ms[arm] += [per_step.get(i, 0.0) for i in range(a.warmup, a.steps)]
                    if arm != "lora_dense":
                        assert count_violations(trainer.model, trainer.masks) == 0
    finally:
        masking.restore()
    base = [statistics.median(t) for t in times["lora_dense"]]
    report = {"device": "cuda" if torch.cuda.is_available() else "cpu", "args": vars(a), "arms": {}}
    for arm in ARMS:
        medians = [statistics.median(t) for t in times[arm]]
        ratios = [m / b for m, b in zip(medians, base)]
        report["arms"][arm] = {
            "step_ms_median": round(statistics.median(medians), 3),
            "ratio_to_lora_dense": round(statistics.median(ratios), 4),
            "ratio_min_max": [round(min(ratios), 4), round(max(ratios), 4)],
            "masking_ms_per_step": round(statistics.median(mask_ms[arm]), 4) if mask_ms[arm] else 0.0,
        }
        print(f"{arm:18s} {report['arms'][arm]}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, sort_keys=True)
            fh.write("\n")


if __name__ == "__main__":
    main()
