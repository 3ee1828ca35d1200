"""Pruning at initialization side by side: train an at-init recipe for every (method, sparsity, seed) and record
test accuracy at the early-stop step (lowest validation loss) and at the end; or, with --connectivity, only the
masks at an extreme sparsity: per-layer kept weights and whether the input still reaches every output.

    python benchmarks/pruning_at_init.py --steps 2000 --seeds 0 1 2 --out docs/results/pruning_at_init.json
    python benchmarks/pruning_at_init.py --connectivity --sparsities 0.999 --methods synflow magnitude
    python benchmarks/pruning_at_init.py --summarize docs/results/pruning_at_init.json   # the markdown table

Every run goes through the project's own recipe path (`load_recipe` + `build_trainer` + `Trainer.train`), with the
overrides printed next to each result; results are appended to --out after every run, so a stopped sweep keeps
what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from hf_tickets.recipes import build_trainer, load_recipe

DEFAULT_RECIPE = "recipes/lenet300_mnist_at_init.yaml"


def _overrides(method: str, sparsity: float, seed: int, steps: int, eval_steps: int, output_dir: str) -> list[str]:
    return [
        f"sparsity.method={method}",
        f"sparsity.sparsity={sparsity}",
        f"sparsity.seed={seed}",
        f"model.seed={seed}",  # theta_0
        f"training.seed={seed}",  # data order
        f"training.max_steps={steps}",
        f"training.eval_steps={eval_steps}",
        f"training.logging_steps={eval_steps}",
        f"training.output_dir={output_dir}",
        *([] if torch.cuda.is_available() else ["training.use_cpu=true"]),
    ]


def train_one(recipe_path: str, overrides: list[str]) -> dict:
    """One run: test accuracy at the lowest validation loss and at the end, the masks' per-layer sparsity."""
    start = time.time()
    trainer = build_trainer(load_recipe(recipe_path, overrides))
    masks = trainer.masks
    trainer.train()
    by_step: dict[int, dict] = {}  # Trainer logs each eval dataset on its own line: merge them by step
    for entry in trainer.state.log_history:
        if any(k.startswith("eval_") for k in entry):
            by_step.setdefault(entry["step"], {"step": entry["step"]}).update(entry)
    evals = [e for _, e in sorted(by_step.items()) if "eval_validation_loss" in e and "eval_test_accuracy" in e]
    if not evals:
        raise RuntimeError("no evaluation was logged: check training.eval_steps against training.max_steps")
    best = min(evals, key=lambda e: e["eval_validation_loss"])
    return {
        "overrides": overrides,
        "sparsity": masks.sparsity(),
        "layer_sparsity": masks.layer_sparsity(),
        "collapsed": masks.collapsed(),
        "early_stop_step": best["step"],
        "test_accuracy_early_stop": best["eval_test_accuracy"],
        "test_accuracy_final": evals[-1]["eval_test_accuracy"],
        "validation_accuracy_early_stop": best.get("eval_validation_accuracy"),
        "seconds": round(time.time() - start, 1),
    }


def connectivity(masks) -> dict:
    """For a chain of Linear weights [out, in] in order: paths from the input to each output unit (a float64
    product of the 0/1 masks), and how many output units any input still reaches."""
    mats = [m.to(torch.float64) for m in masks.values()]
    paths = torch.ones(mats[0].shape[1], dtype=torch.float64)
    for m in mats:
        paths = m @ paths
    return {
        "paths_input_to_output": float(paths.sum()),
        "outputs_reached": int((paths > 0).sum()),
        "outputs": int(paths.numel()),
        "kept_per_layer": {n: int(m.sum()) for n, m in masks.items()},
        "numel_per_layer": {n: m.numel() for n, m in masks.items()},
    }


def summarize(path: str) -> str:
    """A markdown table of a results file: test accuracy mean ± std over seeds per (sparsity, method)."""
    import statistics

    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target_sparsity"], row["method"]), []).append(row)
    lines = [
        "| sparsity | method | seeds | test acc. at early stop (mean ± std) | final test acc. (mean ± std) "
        "| per seed (early stop) |",
        "|---|---|---|---|---|---|",
    ]

    def stat(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"

    for (sparsity, method), group in sorted(groups.items()):
        early = [r["test_accuracy_early_stop"] for r in group]
        final = [r["test_accuracy_final"] for r in group]
        seeds = ", ".join(f"{100 * a:.2f}" for a in early)
        lines.append(f"| {100 * sparsity:g}% | {method} | {len(group)} | {stat(early)} | {stat(final)} | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--methods", nargs="+", default=["snip", "grasp", "synflow", "random"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-steps", type=int, default=250)
    parser.add_argument("--connectivity", action="store_true", help="masks only (no training): layer connectivity")
    parser.add_argument("--out", default=None, help="JSON file the results are appended to")
    parser.add_argument("--summarize", default=None, help="print the markdown table of a results file and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return

    results = []
    if args.out and os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as fh:
            results = json.load(fh)
    for sparsity in args.sparsities:
        for method in args.methods:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    overrides = _overrides(method, sparsity, seed, args.steps, args.eval_steps, tmp)
                    if args.connectivity:
                        overrides = [o for o in overrides if not o.startswith("training.output_dir")]
                        overrides.append(f"training.output_dir={tmp}")
                        trainer = build_trainer(load_recipe(args.recipe, overrides))
                        row = {"overrides": overrides, **connectivity(trainer.masks)}
                        row["collapsed"] = trainer.masks.collapsed()
                    else:
                        row = train_one(args.recipe, overrides)
                row.update(recipe=args.recipe, method=method, target_sparsity=sparsity, seed=seed)
                results.append(row)
                keys = ("test_accuracy_early_stop", "test_accuracy_final", "outputs_reached", "kept_per_layer")
                print(json.dumps({k: row[k] for k in ("method", "target_sparsity", "seed", *keys) if k in row}))
                if args.out:
                    tmp_out = args.out + ".tmp"
                    with open(tmp_out, "w", encoding="utf-8") as fh:
                        json.dump(results, fh, indent=1, sort_keys=True)
                    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
