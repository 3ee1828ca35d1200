"""CPU threads for small models: how fast the quickstart trains with 1, 2, ... torch threads and with torch's default.

`hf-tickets run` sets torch's intra-op threads to `hf_tickets.cpu_threads.SMALL_MODEL_THREADS` when
OMP_NUM_THREADS is unset (issue 15: the quickstart took 4-5x longer without OMP_NUM_THREADS=1). This script is
where that number comes from. Each setting runs in a fresh process (a thread pool is sized once per process) that
trains the quickstart recipe (LeNet-300-100 on the digits set, `recipes/quickstart_digits.yaml`) shortened to
`--levels` pruned levels of `--steps` steps, no controls, through `run_recipe` as `hf-tickets run` does; the wall
time of `run_recipe` alone is taken (imports excluded). Settings alternate over `--rounds` rounds; the median time
per setting and its ratio to the fastest are printed.

    OMP_NUM_THREADS= .venv/bin/python benchmarks/cpu_threads.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys, tempfile, time
threads = int(sys.argv[1])
import torch
if threads > 0:
    torch.set_num_threads(threads)
from hf_tickets.recipes import load_recipe, run_recipe
from hf_tickets.run_log import quiet_progress_bars
out = tempfile.mkdtemp()
recipe = load_recipe(sys.argv[2], [
    f"training.output_dir={out}/run", f"training.max_steps={sys.argv[3]}", f"sparsity.levels={sys.argv[4]}",
    "controls=[]", "training.eval_steps=50", "training.logging_steps=50",
])
start = time.perf_counter()
with quiet_progress_bars():
    run_recipe(recipe)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}))
"""


def run_once(threads: int, steps: int, levels: int) -> dict:
    """One fresh process: `threads` torch threads (0: torch's default), the shortened quickstart; its timing."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    recipe = os.path.join(REPO, "recipes", "quickstart_digits.yaml")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads), recipe, str(steps), str(levels)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"threads={threads} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="*", help="settings to try (default: 1, 2, 4, ... up to the cores)"
    )
    parser.add_argument("--steps", type=int, default=200, help="steps per level")
    parser.add_argument("--levels", type=int, default=2, help="pruned levels after the dense one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the raw timings here")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    settings = args.threads or sorted({1, cores, *(2**i for i in range(1, 8) if 2**i <= cores)})
    settings = [0, *settings]  # 0: torch's own default (what a user gets with OMP_NUM_THREADS unset)
    times: dict[int, list[float]] = {s: [] for s in settings}
    resolved: dict[int, int] = {}
    for r in range(args.rounds):
        for s in settings if r % 2 == 0 else reversed(settings):
            row = run_once(s, args.steps, args.levels)
            times[s].append(row["seconds"])
            resolved[s] = row["threads"]
            print(f"round {r}: threads={row['threads']}{' (default)' if s == 0 else ''}: {row['seconds']:.2f} s")
    medians = {s: statistics.median(v) for s, v in times.items()}
    best = min(medians, key=medians.get)
    steps = (args.levels + 1) * args.steps
    print(f"\nquickstart, {args.levels + 1} levels x {args.steps} steps, {cores} CPU cores, median of {args.rounds}:")
    for s in settings:
        label = f"{resolved[s]} (torch default)" if s == 0 else str(s)
        print(
            f"  threads {label:>18}: {medians[s]:7.2f} s  {steps / medians[s]:7.1f} steps/s  "
            f"{medians[s] / medians[best]:.2f}x the fastest"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cores": cores, "steps": steps, "times": times, "resolved": resolved}, f, indent=2)


if __name__ == "__main__":
    main()
