"""Cost of dynamic sparse training: plain `Trainer` vs `TicketTrainer` with RigL (issue 11's speed goal).

Both arms train the BERT-base-sized model of `enforcement_overhead.py` (built from a config, no download), batch
32, sequence 128, bf16, RigL at 90% ERK with ΔT = `--update-interval` (100). The arms stay resident and take turns
in rounds of `--steps` optimizer steps (a multiple of ΔT, so each round holds the same number of mask updates);
each round is timed as a whole with CUDA events, so the ratio is *amortized* over updates. The mask update itself
(`RigL.on_dense_grads` + `RigL.after_optimizer_step` + the enforcement of the new masks) is timed apart with CUDA
events around the callback's hooks. Prints the median ratio of per-round times with its spread, and the median
update time in steps' worth. Goal: ratio <= 1.03, one update <= 2 steps.

    python benchmarks/dst_overhead.py --rounds 10 --steps 200 --update-interval 100
    python benchmarks/dst_overhead.py --tiny --rounds 2 --steps 4 --update-interval 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from transformers import BertConfig, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import enforcement_overhead as common  # noqa: E402  (the model, the data and the step timer of that benchmark)

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402
from hf_tickets.callbacks import SparsityCallback  # noqa: E402


class UpdateTimer:
    """Times the work of a mask update: RigL's two hooks on an update step and the enforcement of the new masks."""

    def __init__(self) -> None:
        self.updates: list[float] = []
        self._spans: list[tuple] = []

    def install(self, callback: SparsityCallback) -> None:
        method = callback.method
        self._wrap(method, "on_dense_grads", lambda args, out: method.is_update_step(args[2]))
        self._wrap(method, "after_optimizer_step", lambda args, out: out is not None)
        self._wrap(callback, "set_masks", lambda args, out: True, closes_update=True)

    def _wrap(self, owner, name: str, counts, closes_update: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = common._mark()
            out = original(*args, **kwargs)
            if counts(args, out):
                self._spans.append((start, common._mark()))
                if closes_update:
                    self.updates.append(sum(self._elapsed(a, b) for a, b in self._spans))
                    self._spans = []
            return out

        setattr(owner, name, timed)

    @staticmethod
    def _elapsed(start, end) -> float:
        common._sync()
        return common._elapsed_ms(start, end)


def round_ms(trainer) -> float:
    """One train() call, timed on the GPU timeline (host clock on CPU smoke runs)."""
    start = common._mark()
    trainer.train()
    end = common._mark()
    common._sync()
    return common._elapsed_ms(start, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm per round (a multiple of ΔT)")
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the raw numbers here")
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU allowed: a smoke run, not a measurement")
    opts = parser.parse_args()
    if opts.steps % opts.update_interval:
        parser.error("--steps must be a multiple of --update-interval (equal updates per round)")
    if opts.tiny:
        common.MODEL_CONFIG = BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    elif not torch.cuda.is_available():
        parser.error("a measurement needs a CUDA device; use --tiny for a CPU smoke run")
    cuda = torch.cuda.is_available()
    dataset = common.RandomTokens(opts.batch_size * opts.steps, opts.seq_len, common.MODEL_CONFIG.vocab_size)
    args = dict(
        per_device_train_batch_size=opts.batch_size,
        bf16=cuda,
        use_cpu=not cuda,
        max_steps=opts.steps,
        save_strategy="no",
        logging_steps=10**9,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    config = SparsityConfig(
        method="rigl", sparsity=0.9, distribution="erk", update_interval=opts.update_interval, stop_fraction=1.0
    )
    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as out:
        dense = Trainer(model=common.build_model(0), args=TrainingArguments(out, **args), train_dataset=dataset)
        rigl = TicketTrainer(
            model=common.build_model(0),
            args=TrainingArguments(out, **args),
            train_dataset=dataset,
            sparsity_config=config,
        )
        timer.install(rigl.sparsity_callback)
        times: dict[str, list[float]] = {"dense": [], "rigl": []}
        for r in range(opts.rounds + 1):  # round 0 warms up (compilation, allocator) and is dropped
            for name, trainer in (
                (("dense", dense), ("rigl", rigl)) if r % 2 == 0 else (("rigl", rigl), ("dense", dense))
            ):
                ms = round_ms(trainer)
                if r > 0:
                    times[name].append(ms)
    ratios = sorted(b / a for a, b in zip(times["dense"], times["rigl"]))
    step_ms = statistics.median(times["dense"]) / opts.steps
    updates = timer.updates[len(timer.updates) // (opts.rounds + 1) :]  # drop the warm-up round's updates
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "rounds": opts.rounds,
        "steps_per_round": opts.steps,
        "update_interval": opts.update_interval,
        "dense_round_ms": times["dense"],
        "rigl_round_ms": times["rigl"],
        "amortized_ratio_median": statistics.median(ratios),
        "amortized_ratio_min_max": [ratios[0], ratios[-1]],
        "dense_step_ms": step_ms,
        "update_ms_median": statistics.median(updates) if updates else None,
        "update_in_steps": statistics.median(updates) / step_ms if updates else None,
        "updates_timed": len(updates),
    }
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("round_ms")}, indent=2))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
