"""Accuracy of LoRA on a sparse MiniLM, before and after merging (issue 18, item 5), from the project's recipes.

For every seed and base pattern (50% unstructured: recipes/minilm_rotten_tomatoes_lora.yaml; 2:4: its _2to4 twin)
it trains, with `build_trainer` on the recipe and the overrides below:

  dense LoRA      the recipe with sparsity.sparsity=0 and peft.masked=false (pattern runs share it)
  sparse LoRA     peft.masked=false: plain LoRA on the frozen sparse base; evaluated unmerged, then
    naive merge     peft's merge_and_unload(): ΔW added whole, so the base is dense again (its sparsity reported)
    masked merge    hf_tickets.merge_adapters(): merged, then the masks re-applied (ΔW's removed share reported)
  masked LoRA     peft.masked=true: ΔW ⊙ M in the forward; evaluated unmerged and after merge_adapters

and reports test accuracy, the merged weights' sparsity and the removed fraction of ΔW's norm, per seed and as
mean ± std. Full runs take a GPU; `--max-train-samples`, `--epochs` and `--max-length` cut it for a CPU check.

    python scripts/peft_merge_table.py --seeds 0 1 2 --json docs/results/peft_lora_minilm/table.json
    OMP_NUM_THREADS=1 python scripts/peft_merge_table.py --seeds 0 --max-train-samples 2000 --epochs 1 \\
        --max-length 32 --max-eval-samples 1000 --learning-rate 0.002 \\
        --json docs/results/peft_lora_minilm/cpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import Trainer

from hf_tickets import merge_adapters
from hf_tickets.enforce import count_violations
from hf_tickets.peft_interop import masks_for
from hf_tickets.recipes import accuracy, build_trainer, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "50%": os.path.join(REPO, "recipes", "minilm_rotten_tomatoes_lora.yaml"),
    "2:4": os.path.join(REPO, "recipes", "minilm_rotten_tomatoes_lora_2to4.yaml"),
}


def overrides(args, seed: int, out: str) -> list[str]:
    items = [f"training.output_dir={out}", f"training.seed={seed}", f"model.seed={seed}"]
    items.append("training.eval_strategy='no'")  # quoted: YAML reads a bare no as false
    if args.max_train_samples:
        items.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        items.append(f"data.max_eval_samples={args.max_eval_samples}")
    if args.epochs is not None:
        items.append(f"training.num_train_epochs={args.epochs}")
    if args.max_length:
        items.append(f"data.max_length={args.max_length}")
    if args.learning_rate:
        items.append(f"training.learning_rate={args.learning_rate}")
    if not torch.cuda.is_available():
        items.append("training.use_cpu=true")
    return items


def test_accuracy(trainer: Trainer, model) -> float:
    evaluator = Trainer(model=model, args=trainer.args, compute_metrics=accuracy)
    metrics = evaluator.evaluate(eval_dataset=trainer.eval_dataset["test"], metric_key_prefix="test")
    return float(metrics["test_accuracy"])


def zero_fraction(model, masks) -> float:
    """Fraction of zeros over the tensors the masks cover (the base's sparsity as the merged model holds it)."""
    params = dict(model.named_parameters())
    masks = masks_for(model, masks)
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    return zeros / max(masks.numel(), 1)


def run_arm(args, path: str, seed: int, extra: list[str], tmp: str):
    recipe = load_recipe(path, overrides(args, seed, os.path.join(tmp, "run")) + extra)
    trainer = build_trainer(recipe)
    trainer.train()
    trainer.model.eval()
    return trainer


def one_seed(args, seed: int, tmp: str) -> dict:
    row: dict = {"seed": seed}
    start = time.time()
    dense = run_arm(args, RECIPES["50%"], seed, ["sparsity.sparsity=0.0", "peft.masked=false"], tmp)
    row["dense_lora"] = test_accuracy(dense, dense.model)
    for pattern, path in RECIPES.items():
        sparse = run_arm(args, path, seed, ["peft.masked=false"], tmp)
        masks = sparse.masks
        row[f"{pattern} sparse_lora"] = test_accuracy(sparse, sparse.model)
        naive = copy.deepcopy(sparse.model).merge_and_unload()
        row[f"{pattern} naive_merge"] = test_accuracy(sparse, naive)
        row[f"{pattern} naive_merge_sparsity"] = zero_fraction(naive, masks)
        merged, report = merge_adapters(copy.deepcopy(sparse.model), masks)
        assert count_violations(merged, masks_for(merged, masks)) == 0
        row[f"{pattern} masked_merge"] = test_accuracy(sparse, merged)
        row[f"{pattern} masked_merge_removed_norm"] = report.removed_fraction
        masked = run_arm(args, path, seed, ["peft.masked=true"], tmp)
        row[f"{pattern} masked_lora"] = test_accuracy(masked, masked.model)
        merged, report = merge_adapters(masked.model, masked.masks)
        row[f"{pattern} masked_lora_merged"] = test_accuracy(masked, merged)
        row[f"{pattern} masked_lora_merged_sparsity"] = zero_fraction(merged, masked.masks)
    row["seconds"] = round(time.time() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the recipes' 5e-4")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="merge the rows of result files (one per seed, run in parallel) into --json",
    )
    args = parser.parse_args()
    if args.combine:
        rows = [row for path in args.combine for row in json.load(open(path, encoding="utf-8"))["rows"]]
        _write(args, sorted(rows, key=lambda r: r["seed"]))
        return
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_seed(args, seed, tmp))
        print(json.dumps(rows[-1]), flush=True)
        _write(args, rows)  # after every seed: a long run keeps what it finished


def _write(args, rows: list[dict]) -> None:
    """Rows and their mean ± std per column, to --json (when given) and the console."""
    summary = {k: _mean_std([r[k] for r in rows]) for k in rows[0] if k != "seed"}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, fh, indent=2, sort_keys=True)
            fh.write("\n")
    for key, value in summary.items():
        print(f"{key:36s} {value}")


def _mean_std(values: list[float]) -> list[float]:
    return [round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]


if __name__ == "__main__":
    main()
