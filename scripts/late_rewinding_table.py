"""The late-rewinding table of issue 19, part 2: runs of one recipe that differ only in the rewind step k.

Each RUN is a finished (or partly finished) `hf-tickets run` folder, with or without replicates. Per level it prints
the test accuracy at the early-stop step of the ticket and of the random-pruning control for every k (mean ± std
over replicates when there are several), then, per k, the sparsest level whose ticket is within the tolerance of
dense (the winning tickets of the run report) and the ticket's lead over random pruning at the last level both
reached. Rewinding to initialization "fails" where k = 0 loses that range and a k > 0 keeps it.

    python scripts/late_rewinding_table.py runs/late_rewinding/resnet20_fashion_mnist_k*
"""

from __future__ import annotations

import argparse
import os

from hf_tickets.lottery.layout import has_finished_levels, level_dir, read_metrics, replicate_roots
from hf_tickets.lottery.report import levels_report, percent_text


def run_summary(run_dir: str, tolerance: float) -> dict:
    """The run's rewind step k and its per-level aggregate (a run of one replicate aggregates to n = 1)."""
    if not has_finished_levels(run_dir):
        raise SystemExit(f"{run_dir}: not a run folder with a finished level (level_NN/metrics.json)")
    report = levels_report(run_dir, tolerance)  # refreshes the run's imp_report.json; trains nothing
    k = read_metrics(level_dir(replicate_roots(run_dir)[0], 0)).get("rewind_step_k") or 0
    return {"dir": run_dir, "k": int(k), "report": report}


def table(runs: list[dict]) -> str:
    runs = sorted(runs, key=lambda run: run["k"])
    ks = [run["k"] for run in runs]
    if len(set(ks)) != len(ks):
        raise SystemExit(f"two runs share a rewind step: {[(run['dir'], run['k']) for run in runs]}")
    by_level = [{e["level"]: e for e in run["report"]["levels"]} for run in runs]
    levels = sorted(set().union(*by_level))
    header = ["level", "remaining"]
    for k in ks:
        header += [f"k={k} ticket", f"k={k} random pruning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in levels:
        remaining = next(rows[level]["remaining_weights_pct"] for rows in by_level if level in rows)
        cells = []
        for rows in by_level:
            entry = rows.get(level, {})
            cells += [percent_text(entry.get("ticket")), percent_text(entry.get("random_prune"))]
        lines.append(f"| {level} | {remaining:.2f}% | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| k | dense | sparsest ticket within tolerance of dense | ticket − random pruning at the last level |",
    ]
    lines.append("|---|---|---|---|")
    last = max(set.intersection(*(set(rows) for rows in by_level)))
    for run, rows in zip(runs, by_level):
        report = run["report"]
        winning = report["winning_ticket_levels"]
        sparsest = f"{rows[max(winning)]['remaining_weights_pct']:.2f}% (level {max(winning)})" if winning else "none"
        entry = rows[last]
        lead = ""
        if "ticket" in entry and "random_prune" in entry:
            lead = f"{100 * (entry['ticket']['mean'] - entry['random_prune']['mean']):+.2f} at level {last}"
        dense = report["dense_accuracy"]
        dense_text = f"{100 * dense:.2f}" if dense is not None else ""
        lines.append(f"| {run['k']} | {dense_text} | {sparsest} | {lead} |")
    tolerance = runs[0]["report"]["tolerance"]
    lines += [
        "",
        f"Test accuracy (%) at the early-stop step; a winning ticket is within {100 * tolerance:g} percentage points "
        "of dense.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders of one recipe at different rewind steps k")
    parser.add_argument("--tolerance", type=float, default=0.01, help="winning ticket: within this of dense (0.01)")
    args = parser.parse_args()
    missing = [run for run in args.runs if not os.path.isdir(run)]
    if missing:
        raise SystemExit(f"not a folder: {missing}")
    print(table([run_summary(run, args.tolerance) for run in args.runs]))


if __name__ == "__main__":
    main()
