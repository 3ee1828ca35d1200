"""One accelerate mode, checked: plain `Trainer` and `TicketTrainer` (magnitude 50%) train the same model on the same
random tokens; the step times of both, pruned weights that are not exactly zero after training (module weights, and
DeepSpeed's fp32 master copy), and what a refused launch said, go to OUT/<mode>.json.

    accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/accelerate_mode_check.py --mode ddp --out OUT

Run by scripts/gpu_accelerate_configs.sh for every config in recipes/accelerate/. `--size base` is BERT-base
(12 layers, hidden 768, 110M parameters, random init); `--size tiny` is 2 layers of 64 for CPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.distributed import world_size
from hf_tickets.enforce import count_violations

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised on CUDA, so the time is the step's, not its launch's)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def build(size: str) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2, **SIZES[size]))


def train(kind: str, args: argparse.Namespace) -> dict:
    training = TrainingArguments(
        output_dir=os.path.join(args.out, f"{args.mode}_{kind}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
    )
    timer = StepTimer()
    common = dict(model=build(args.size), args=training, train_dataset=Tokens(64 * args.batch, args.seq, 30522))
    if kind == "trainer":
        trainer = Trainer(**common, callbacks=[timer])
    else:
        trainer = TicketTrainer(
            **common, callbacks=[timer], sparsity_config=SparsityConfig(method="magnitude", sparsity=0.5)
        )
    trainer.train()
    steady = timer.times[args.warmup :] or timer.times
    result = {"step_s_median": statistics.median(steady), "steps": len(timer.times)}
    if kind == "ticket":
        leaks = torch.tensor([count_violations(trainer.model, trainer.masks)], device=training.device)
        if world_size() > 1:
            torch.distributed.all_reduce(leaks)  # FSDP2: each rank counted its own shards
        result["leaks"] = int(leaks.item())
        result["sparsity"] = trainer.masks.sparsity()
        result["master_leaks"] = master_leaks(trainer)
    return result


def master_leaks(trainer: TicketTrainer):
    """Pruned entries of DeepSpeed's fp32 master weights that are not zero (None without DeepSpeed)."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    named = dict(trainer.model.named_parameters())
    total = 0
    for name, mask in trainer.masks.items():
        full = safe_get_full_fp32_param(named[name])  # a collective under ZeRO-2
        total += int((full[~mask.to(full.device)] != 0).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--expect-refusal", action="store_true", help="the mode must be refused before training")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result: dict = {"mode": args.mode, "size": args.size, "steps": args.steps}
    try:
        result["ticket"] = train("ticket", args)
    except ValueError as err:  # a refused combination (hf_tickets.distributed.check_supported)
        result["refused"] = str(err)
    if "ticket" in result:
        result["trainer"] = train("trainer", args)
        result["world_size"] = world_size()
        result["ratio_ticket_vs_trainer"] = result["ticket"]["step_s_median"] / result["trainer"]["step_s_median"]
    ok = (
        ("refused" in result)
        if args.expect_refusal
        else ("ticket" in result and result["ticket"]["leaks"] == 0 and not result["ticket"]["master_leaks"])
    )
    result["ok"] = bool(ok)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        with open(os.path.join(args.out, f"{args.mode}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        print(json.dumps(result))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
