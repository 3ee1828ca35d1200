"""Test accuracy of several recipe "arms" over seeds, side by side: mean ± std per arm as a markdown table.

Each arm is a recipe plus overrides; every (arm, seed) trains through the project's own path (`load_recipe` +
`build_trainer` + `Trainer.train`) with `training.seed` and `model.seed` set to the seed, and
records test accuracy at the early-stop step (lowest validation loss) and at the end. Rows are appended to --json
after every run, so a stopped sweep keeps what it finished, and a rerun skips (arm, seed) pairs already there.

    python scripts/recipe_seed_table.py --seeds 0 1 2 --json docs/results/nm_minilm/seeds.json \\
        --arm "dense=recipes/bert_rotten_tomatoes_2_4.yaml 'sparsity={method: magnitude, sparsity: 0}'" \\
        --arm "2:4 one-shot + fine-tune=recipes/bert_rotten_tomatoes_2_4.yaml" \\
        --arm "2:4 SR-STE=recipes/bert_rotten_tomatoes_sr_ste.yaml"
    python scripts/recipe_seed_table.py --summarize docs/results/nm_minilm/seeds.json

`{seed}` in an override is replaced by the seed, so an arm can start from another arm's saved model of the same
seed (--save-models DIR saves every final model as DIR/<arm name, spaces as dashes>_s<seed>):

    python scripts/recipe_seed_table.py --seeds 0 --json dense.json --save-models models \
        --arm "dense=recipes/bert_rotten_tomatoes_2_4.yaml 'sparsity={method: magnitude, sparsity: 0}'"
    python scripts/recipe_seed_table.py --seeds 0 --json asp.json \
        --arm "2:4 after dense=recipes/bert_rotten_tomatoes_2_4.yaml model.pretrained=models/dense_s{seed}"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time

import torch

from hf_tickets.recipes import build_trainer, load_recipe


def parse_arm(text: str) -> tuple[str, str, list[str]]:
    """`NAME=RECIPE override ...` -> (name, recipe path, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not rest.strip():
        raise SystemExit(f"--arm {text!r}: use 'NAME=RECIPE [key=value ...]'")
    recipe, *overrides = shlex.split(rest)
    if not os.path.isfile(recipe):
        raise SystemExit(f"--arm {name!r}: recipe {recipe!r} does not exist")
    return name.strip(), recipe, overrides


def train_one(recipe: str, overrides: list[str], save_to: str | None = None) -> dict:
    """One run: test accuracy at the lowest validation loss and at the end, and the masks' sparsity. With `save_to`
    the final model is saved there (a later arm can start from it: `model.pretrained=DIR/ARM_s{seed}`)."""
    start = time.time()
    trainer = build_trainer(load_recipe(recipe, overrides))
    trainer.train()
    if save_to:
        trainer.save_model(save_to)
    by_step: dict[int, dict] = {}  # Trainer logs each eval dataset on its own line: merge them by step
    for entry in trainer.state.log_history:
        if any(k.startswith("eval_") for k in entry):
            by_step.setdefault(entry["step"], {"step": entry["step"]}).update(entry)
    evals = [e for _, e in sorted(by_step.items()) if "eval_validation_loss" in e and "eval_test_accuracy" in e]
    if not evals:
        raise RuntimeError("no evaluation was logged: check training.eval_steps against the run's length")
    best = min(evals, key=lambda e: e["eval_validation_loss"])
    masks = trainer.masks
    return {
        "sparsity": masks.sparsity() if masks is not None else 0.0,
        "early_stop_step": best["step"],
        "test_accuracy_early_stop": best["eval_test_accuracy"],
        "test_accuracy_final": evals[-1]["eval_test_accuracy"],
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - start, 1),
    }


def _stat(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def summarize(*paths: str) -> str:
    """Markdown: per arm, seeds, mean ± std of test accuracy at early stop and at the end, per-seed values."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            rows += json.load(fh)
    arms: dict[str, list[dict]] = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    lines = [
        "| arm | seeds | sparsity | test acc. at early stop | final test acc. | per seed (early stop) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, group in arms.items():
        group = sorted(group, key=lambda r: r["seed"])
        early = [r["test_accuracy_early_stop"] for r in group]
        final = [r["test_accuracy_final"] for r in group]
        per_seed = ", ".join(f"{r['seed']}: {100 * r['test_accuracy_early_stop']:.2f}" for r in group)
        sparsity = f"{100 * statistics.mean(r['sparsity'] for r in group):.1f}%"
        lines.append(f"| {arm} | {len(group)} | {sparsity} | {_stat(early)} | {_stat(final)} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", default=[], help="'NAME=RECIPE [key=value ...]' (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="results file (appended after every run)")
    parser.add_argument("--save-models", metavar="DIR", help="save each run's final model as DIR/<arm>_s<seed>")
    parser.add_argument(
        "--summarize", metavar="JSON", nargs="+", help="print the markdown table of results files and exit"
    )
    args = parser.parse_args()
    if args.summarize:
        print(summarize(*args.summarize))
        return
    if not args.arm or not args.json:
        parser.error("give --arm (one or more) and --json, or --summarize")
    arms = [parse_arm(a) for a in args.arm]
    rows = json.load(open(args.json, encoding="utf-8")) if os.path.exists(args.json) else []
    done = {(r["arm"], r["seed"]) for r in rows}
    for seed in args.seeds:  # seed-major: a stopped sweep has every arm at the first seeds
        for name, recipe, overrides in arms:
            if (name, seed) in done:
                continue
            with tempfile.TemporaryDirectory() as out:
                extra = [f"training.seed={seed}", f"model.seed={seed}", f"training.output_dir={out}"]
                if not torch.cuda.is_available():
                    extra.append("training.use_cpu=true")
                ovr = [*(o.replace("{seed}", str(seed)) for o in overrides), *extra]
                save_to = None
                if args.save_models:
                    save_to = os.path.join(args.save_models, f"{name.replace(' ', '-')}_s{seed}")
                result = train_one(recipe, ovr, save_to)
                row = {"arm": name, "seed": seed, "recipe": recipe, "overrides": ovr, **result}
            rows.append(row)
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(rows, fh, indent=1)
            print(
                f"[{name} seed {seed}] test acc. {100 * row['test_accuracy_early_stop']:.2f} at step "
                f"{row['early_stop_step']} (final {100 * row['test_accuracy_final']:.2f}), {row['seconds']} s",
                flush=True,
            )
    print(summarize(args.json))


if __name__ == "__main__":
    main()
