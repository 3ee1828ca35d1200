"""Does the batched engine train what `Trainer` trains? Replay Trainer's own batch order through it and compare.

LeNet-300-100 on MNIST (data on the device), SGD lr 0.1, batch 128, `--steps` steps. Arm A: `transformers.Trainer`,
recording the indices its sampler hands out. Arm B: `train_lockstep` (CUDA-graph replay on a GPU) fed exactly those
batches. Prints the largest weight difference and both test accuracies; then the same Trainer run with
`dataloader_drop_last=False` (a short batch at the end of every epoch, which the engine never makes) to show what
that alone changes.

    HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site python3 benchmarks/replay_trainer_batches.py --json $OUT/replay.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = {k: v.to(device) for k, v in load_splits("ylecun/mnist", offline=True).items()}
    out = {}
    for drop_last in (True, False):
        train = Recording(splits["train"].pixel_values, splits["train"].labels)
        torch.manual_seed(opts.seed)
        model = build_model("lenet_300_100").to(device)
        theta0 = {k: v.clone() for k, v in model.state_dict().items()}
        args = TrainingArguments(
            tempfile.mkdtemp(),
            max_steps=opts.steps,
            per_device_train_batch_size=128,
            optim="sgd",
            learning_rate=0.1,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            weight_decay=0.0,
            dataloader_drop_last=drop_last,
            dataloader_pin_memory=False,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=opts.seed,
            use_cpu=device.type == "cpu",
        )
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
