"""Pruning at initialization side by side: train an at-init recipe for every (method, sparsity, seed) and record
test accuracy at the early-stop step (lowest validation loss) and at the end; or, with --connectivity, only the
masks at an extreme sparsity: per-layer kept weights and whether the input still reaches every output.

    python benchmarks/pruning_at_init.py --steps 2000 --seeds 0 1 2 --out docs/results/pruning_at_init.json
    python benchmarks/pruning_at_init.py --methods imp --steps 4000 --seeds 0 1 2   # the IMP ticket beside them
    python benchmarks/pruning_at_init.py --connectivity --sparsities 0.999 --methods synflow magnitude
    python benchmarks/pruning_at_init.py --summarize a.json b.json   # one markdown table

Every run goes through the project's own recipe path (`load_recipe` + `build_trainer` + `Trainer.train`), with the
overrides printed next to each result; results are appended to --out after every run, so a stopped sweep keeps
what it finished.

`--methods imp` is the lottery ticket on the same setup: one IMP run per seed (`sparsity.method=imp`, rewind to
theta_0, one global ranking, --steps per level, `run_recipe` on the lockstep backend by default) through every level
up to the sparsest target, and a row per target from the level nearest it. The per-level rate is 20% adjusted so
that a level lands exactly on the least sparse target (1 - 0.05**(1/13) = 20.58% reaches 95.00% at level 13 and
98.01% at level 17); --imp-prune-fraction sets it instead. Each seed is its own run with model.seed = training.seed
= seed, so its theta_0 is the at-init runs' model of that seed (replicates of one run would draw other theta_0s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

from hf_tickets.masks import MaskSet
from hf_tickets.recipes import build_trainer, load_recipe, run_recipe

DEFAULT_RECIPE = "recipes/lenet300_mnist_at_init.yaml"
IMP_BASE_RATE = 0.2  # the LTH papers' per-level rate, adjusted by imp_prune_fraction to land on a target


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


def imp_prune_fraction(sparsities: list[float]) -> float:
    """The per-level rate near 20% whose level n lands exactly on the least sparse target: (1 - p)**n = 1 - target."""
    lowest = min(sparsities)
    levels = max(1, round(math.log(1.0 - lowest) / math.log(1.0 - IMP_BASE_RATE)))
    return 1.0 - (1.0 - lowest) ** (1.0 / levels)


def imp_levels(sparsities: list[float], prune_fraction: float) -> dict[float, int]:
    """Target sparsity -> the IMP level whose sparsity 1 - (1 - p)**level is nearest to it."""
    return {s: max(1, round(math.log(1.0 - s) / math.log(1.0 - prune_fraction))) for s in sparsities}


def run_imp(recipe_path: str, overrides: list[str], levels: dict[float, int]) -> dict[float, dict]:
    """One IMP run through max(levels) levels; for each target, the row of its level (read from metrics.json)."""
    start = time.time()
    recipe = load_recipe(recipe_path, overrides)
    summary = run_recipe(recipe)
    seconds = round(time.time() - start, 1)
    rows = {}
    for target, level in {0.0: 0, **levels}.items():
        folder = os.path.join(summary["output_dir"], f"level_{level:02d}")
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
            metrics = json.load(fh)
        rows[target] = {
            "overrides": overrides,
            "level": level,
            "sparsity": metrics["sparsity"],
            "layer_sparsity": metrics["layer_sparsity"],
            "collapsed": MaskSet.load(folder).collapsed(),
            "early_stop_step": metrics["early_stop_step"],
            "test_accuracy_early_stop": metrics["test_at_early_stop"]["accuracy"],
            "test_accuracy_final": metrics["final_test"]["accuracy"],
            "validation_accuracy_early_stop": metrics["best_eval"]["accuracy"],
            "backend": metrics.get("backend"),
            "seconds": seconds,  # the whole IMP run, every level
        }
    return rows


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


def summarize(*paths: str) -> str:
    """A markdown table of results files: test accuracy mean ± std over seeds per (sparsity, method)."""
    import statistics

    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            rows += json.load(fh)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target_sparsity"], row["method"]), []).append(row)
    lines = [
        "| sparsity | method | seeds | sparsity reached | test acc. at early stop (mean ± std) "
        "| final test acc. (mean ± std) | per seed (early stop) |",
        "|---|---|---|---|---|---|---|",
    ]

    def stat(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"

    for (sparsity, method), group in sorted(groups.items()):
        early = [r["test_accuracy_early_stop"] for r in group]
        final = [r["test_accuracy_final"] for r in group]
        seeds = ", ".join(f"{100 * a:.2f}" for a in early)
        reached = f"{100 * statistics.mean(r['sparsity'] for r in group):.2f}%"
        name = f"{method} (level {group[0]['level']})" if "level" in group[0] else method
        lines.append(
            f"| {100 * sparsity:g}% | {name} | {len(group)} | {reached} | {stat(early)} | {stat(final)} | {seeds} |"
        )
    return "\n".join(lines)


def _imp_overrides(seed: int, levels: int, prune_fraction: float, args, output_dir: str) -> list[str]:
    at_init = _overrides("imp", 0.0, seed, args.steps, args.eval_steps, output_dir)
    return [
        *(o for o in at_init if not o.startswith("sparsity.sparsity=")),
        "sparsity.sparsity=null",  # the levels say how far: IMP takes one of the two
        f"sparsity.levels={levels}",
        f"sparsity.prune_fraction={prune_fraction:.6f}",
        "sparsity.rewind=init",  # theta_0
        f"backend={args.imp_backend}",
    ]


def _save(results: list[dict], out: str | None) -> None:
    if out:
        with open(out + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1, sort_keys=True)
        os.replace(out + ".tmp", out)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--methods", nargs="+", default=["snip", "grasp", "synflow", "random"], help="or imp")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (IMP: per level)")
    parser.add_argument("--eval-steps", type=int, default=250)
    parser.add_argument("--imp-prune-fraction", type=float, default=None, help="default: imp_prune_fraction()")
    parser.add_argument("--imp-backend", choices=["lockstep", "trainer"], default="lockstep")
    parser.add_argument("--connectivity", action="store_true", help="masks only (no training): layer connectivity")
    parser.add_argument("--out", default=None, help="JSON file the results are appended to")
    parser.add_argument("--summarize", nargs="+", default=None, help="print the markdown table of results files")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(*args.summarize))
        return []
    if args.connectivity and "imp" in args.methods:
        parser.error("--connectivity takes at-init methods only: IMP's masks come from training")

    results = []
    if args.out and os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as fh:
            results = json.load(fh)
    keys = ("level", "test_accuracy_early_stop", "test_accuracy_final", "outputs_reached", "kept_per_layer")
    for sparsity in args.sparsities:
        for method in (m for m in args.methods if m != "imp"):
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
                print(json.dumps({k: row[k] for k in ("method", "target_sparsity", "seed", *keys) if k in row}))
                _save(results, args.out)
    if "imp" in args.methods:
        fraction = args.imp_prune_fraction or imp_prune_fraction(args.sparsities)
        levels = imp_levels(args.sparsities, fraction)
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                overrides = _imp_overrides(seed, max(levels.values()), fraction, args, tmp)
                rows = run_imp(args.recipe, overrides, levels)
            for target, row in rows.items():  # target 0.0: level 0, the dense network of the same run
                row.update(recipe=args.recipe, method="imp" if target else "dense", target_sparsity=target, seed=seed)
                results.append(row)
                print(json.dumps({k: row[k] for k in ("method", "target_sparsity", "seed", *keys) if k in row}))
            _save(results, args.out)
    return results


if __name__ == "__main__":
    main()
