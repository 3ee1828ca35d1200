"""Does the batched engine train what `Trainer` trains? Replay Trainer's own batch order through it and compare.

LeNet-300-100 on MNIST (data on the device), SGD lr 0.1, batch 128, `--steps` steps. Arm A: `transformers.Trainer`,
recording the indices its sampler hands out. Arm B: `train_lockstep` (CUDA-graph replay on a GPU) fed exactly those
batches. Prints the largest weight difference and both test accuracies; then the same Trainer run with
`dataloader_drop_last=False` (a short batch at the end of every epoch, which the engine never makes) to show what
that alone changes.

    HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site python3 benchmarks/replay_trainer_batches.py --json $OUT/replay.json

With `--paired-seeds N`: does the engine's own data order (`batch_tables`) train differently from Trainer's
sampler? For seeds 0..N-1, the same theta_0 (the seed's) is trained by the engine twice, once on the batch order
Trainer draws with that seed and once on the engine's order; the paired difference of test accuracy says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_tickets.data import TensorImageDataset, load_splits  # noqa: E402
from hf_tickets.lottery.lockstep import ArmStart, SplitTensors, plan_from_training_args, train_lockstep  # noqa: E402
from hf_tickets.models import build_model  # noqa: E402


class Recording(TensorImageDataset):
    def __init__(self, pixel_values, labels):
        super().__init__(pixel_values, labels)
        self.batches: list[list[int]] = []

    def __getitems__(self, indices):
        self.batches.append([int(i) for i in indices])
        return super().__getitems__(indices)


@torch.no_grad()
def test_accuracy(model, split) -> float:
    model.eval()
    logits = torch.cat([model(split.pixel_values[i : i + 5000]).logits for i in range(0, len(split), 5000)])
    return float((logits.argmax(-1) == split.labels).double().mean())


def paired_orders(opts, splits, device) -> dict:
    """Test accuracy of the same theta_0 trained on Trainer's batch order and on the engine's (one pass each)."""
    from hf_tickets.lottery.lockstep import batch_tables

    thetas, recorded = [], []
    for seed in range(opts.paired_seeds):
        train = Recording(splits["train"].pixel_values, splits["train"].labels)
        torch.manual_seed(seed)
        model = build_model("lenet_300_100").to(device)
        thetas.append({k: v.clone() for k, v in model.state_dict().items()})
        # lr 0: only the sampler matters here, and it draws the same order whatever the model does.
        args = arguments(opts, device, seed, drop_last=True, learning_rate=0.0)
        Trainer(model=model, args=args, train_dataset=train, data_collator=TensorImageDataset.collate).train()
        recorded.append(torch.tensor(train.batches[: opts.steps], device=device))
    args = arguments(opts, device, 0, drop_last=True)
    plan = plan_from_training_args(args, build_model("lenet_300_100"), len(splits["train"]), None)
    own = torch.cat(
        [batch_tables(_with_seed(plan, seed), len(splits["train"]), 1, device) for seed in range(len(thetas))]
    )
    evals = {"test": SplitTensors(splits["test"].pixel_values, splits["test"].labels)}
    train_split = SplitTensors(splits["train"].pixel_values, splits["train"].labels)
    arms = [ArmStart(theta, None, 0, None, i) for i, theta in enumerate(thetas)]
    out = {}
    for name, tables in (("trainer_order", torch.stack(recorded)), ("engine_order", own)):
        results = train_lockstep(build_model("lenet_300_100"), arms, plan, train_split, evals, tables)
        out[name] = [r.history[-1]["test"]["accuracy"] for r in results]
    diffs = [a - b for a, b in zip(out["engine_order"], out["trainer_order"])]
    out["paired_difference_mean"] = statistics.mean(diffs)
    out["paired_difference_std_error"] = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    print(
        f"paired over {len(diffs)} seeds: Trainer's order {statistics.mean(out['trainer_order']):.4f}, engine's order "
        f"{statistics.mean(out['engine_order']):.4f}, difference {out['paired_difference_mean']:+.4f} "
        f"(std error {out['paired_difference_std_error']})",
        flush=True,
    )
    return out


def _with_seed(plan, seed: int):
    import dataclasses

    return dataclasses.replace(plan, seed=seed)


def arguments(opts, device, seed: int, drop_last: bool, learning_rate: float = 0.1) -> TrainingArguments:
    return TrainingArguments(
        tempfile.mkdtemp(),
        max_steps=opts.steps,
        per_device_train_batch_size=128,
        optim="sgd",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        dataloader_drop_last=drop_last,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=seed,
        use_cpu=device.type == "cpu",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paired-seeds", type=int, default=0, help="compare data orders over this many seeds")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = {k: v.to(device) for k, v in load_splits("ylecun/mnist", offline=True).items()}
    out = {}
    if opts.paired_seeds:
        out["paired"] = paired_orders(opts, splits, device)
    for drop_last in (True, False):
        train = Recording(splits["train"].pixel_values, splits["train"].labels)
        torch.manual_seed(opts.seed)
        model = build_model("lenet_300_100").to(device)
        theta0 = {k: v.clone() for k, v in model.state_dict().items()}
        args = arguments(opts, device, opts.seed, drop_last)
        Trainer(model=model, args=args, train_dataset=train, data_collator=TensorImageDataset.collate).train()
        row = {"trainer_test_accuracy": test_accuracy(model, splits["test"])}
        if drop_last:
            plan = plan_from_training_args(args, model, len(train), None)
            tables = torch.tensor(train.batches[: plan.total_steps], device=device).unsqueeze(0)
            evals = {"test": SplitTensors(splits["test"].pixel_values, splits["test"].labels)}
            template = build_model("lenet_300_100")
            train_split = SplitTensors(train.pixel_values, train.labels)
            result = train_lockstep(template, [ArmStart(theta0)], plan, train_split, evals, tables)[0]
            trained = model.state_dict()
            row["max_abs_weight_diff"] = max(
                float((result.weights[k].to(device) - trained[k]).abs().max()) for k in result.weights
            )
            row["engine_test_accuracy"] = result.history[-1]["test"]["accuracy"]
        out[f"drop_last={drop_last}"] = row
        print(f"drop_last={drop_last}: {row}", flush=True)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump({"device": str(device), "steps": opts.steps, "seed": opts.seed, **out}, fh, indent=2)


if __name__ == "__main__":
    main()
