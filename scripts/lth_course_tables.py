"""The course report's LTH tables from runs of recipes/lth_course/*.yaml, next to the report's own figures.

For each run folder under ROOT (one per recipe, each with replicate_* folders) it reads the run report that
`hf-tickets run` writes (`imp_report.json`: per round, mean ± std over replicates of test accuracy at the early-stop
step, for the ticket and both controls) and prints markdown: the per-round table, the summary row the report gives
(peak accuracy, where, and the range of remaining weights within 2 points of dense), the two comparisons it quotes
(rewind vs random re-init near 2% of the weights, magnitude vs random pruning near 5.77%), and, round by round
once the network starts to be cut, how many units of the smallest and the output layer keep no weight in each
replicate, next to its accuracy.

    python scripts/lth_course_tables.py runs/lth_course > docs/results/lth_course/tables.md
"""

from __future__ import annotations

import argparse
import os
import sys

from hf_tickets import MaskSet
from hf_tickets.files import MASKS_NAME
from hf_tickets.lottery.layout import has_finished_levels, level_dir, read_metrics, replicate_roots, trunk_levels
from hf_tickets.lottery.report import levels_report, percent_text

# The course report's figures (accuracy %, remaining %), as quoted in the issue.
COURSE = {
    "lenet300_mnist": {
        "peak": (98.35, 24),
        "range": (24, 6),
        "reinit": (1.98, 96.30, 76.55),
        "random": (5.77, 97.79, 96.05),
    },
    "lenet5_mnist": {"peak": (99.16, 49), "range": (49, 6), "reinit": (1.99, 94.31, 60.72)},
    "lenet300_fashion_mnist": {"peak": (89.10, 17), "range": (17, 6), "reinit": (4.05, 86.25, 63.02)},
    "lenet5_fashion_mnist": {"peak": (88.92, 49), "range": (49, 9), "random": (5.77, 88.37, 84.27)},
}


def _nearest(levels: list[dict], pct: float) -> dict:
    return min(levels, key=lambda e: abs(e["remaining_weights_pct"] - pct))


def run_tables(name: str, run_dir: str) -> str:
    report = levels_report(run_dir)  # refreshes imp_report.json from the levels on disk (reads, trains nothing)
    levels = [e for e in report["levels"] if "ticket" in e]
    n = report.get("replicates", 1)
    lines = [f"### {name} ({n} replicate{'s' * (n != 1)}, rounds 0-{levels[-1]['level']})", ""]
    lines += [
        "| round | remaining | ticket (rewind to θ0) | reinit | random pruning | early-stop iteration |",
        "|---|---|---|---|---|---|",
    ]
    for e in levels:
        stop = e.get("early_stop_step")
        stop_text = f"{stop['mean']:.0f}" if stop else ""
        lines.append(
            f"| {e['level']} | {e['remaining_weights_pct']:.2f}% | {percent_text(e.get('ticket'))} | "
            f"{percent_text(e.get('reinit'))} | {percent_text(e.get('random_prune'))} | {stop_text} |"
        )
    dense = levels[0]["ticket"]["mean"]
    peak = max(levels, key=lambda e: e["ticket"]["mean"])
    within = [e["remaining_weights_pct"] for e in levels if e["level"] > 0 and e["ticket"]["mean"] >= dense - 0.02]
    course = COURSE.get(name, {})
    lines += ["", "| | this run (mean over replicates) | course report (one run) |", "|---|---|---|"]
    peak_course = f"{course['peak'][0]:.2f}% at {course['peak'][1]}%" if "peak" in course else "—"
    lines.append(
        f"| peak accuracy | {100 * peak['ticket']['mean']:.2f}% at {peak['remaining_weights_pct']:.1f}% "
        f"(dense {100 * dense:.2f}%) | {peak_course} |"
    )
    range_course = f"{course['range'][0]}–{course['range'][1]}%" if "range" in course else "—"
    range_here = f"{max(within):.1f}–{min(within):.1f}%" if within else "none"
    lines.append(f"| range within 2 points of dense | {range_here} | {range_course} |")
    for key, other, label in (
        ("reinit", "reinit", "rewind vs random re-init"),
        ("random", "random_prune", "magnitude vs random pruning"),
    ):
        pct = course.get(key, (5.77 if key == "random" else 1.98,))[0]
        e = _nearest(levels, pct)
        if other not in e:
            continue
        here = f"{100 * e['ticket']['mean']:.2f} vs {100 * e[other]['mean']:.2f} at {e['remaining_weights_pct']:.2f}%"
        there = f"{course[key][1]:.2f} vs {course[key][2]:.2f} at {course[key][0]}%" if key in course else "—"
        lines.append(f"| {label} | {here} | {there} |")
    lines += ["", _cut_units(run_dir), ""]
    return "\n".join(lines)


def _cut_units(run_dir: str) -> str:
    """Where the network is cut: per round, the smallest layer's and the output layer's units that keep no weight
    in each replicate, next to that replicate's ticket accuracy, from the first round where any is empty (or the
    last three rounds). Tells a collapse caused by the per-layer rate apart from one of the strategy."""
    roots = replicate_roots(run_dir)
    rounds = trunk_levels(roots[0])
    if not all(os.path.isfile(os.path.join(level_dir(root, r), MASKS_NAME)) for root in roots for r in rounds):
        return "(Units cut off: not counted, the run folders hold no masks.)"
    masks = {(i, r): MaskSet.load(level_dir(root, r)) for i, root in enumerate(roots) for r in rounds}
    first = masks[0, rounds[0]]
    layers = list(dict.fromkeys([min(first, key=lambda n: first[n].numel()), list(first)[-1]]))
    dead = {key: m.dead_output_units() for key, m in masks.items()}
    cut = [r for r in rounds if any(dead[i, r].get(n) for i in range(len(roots)) for n in layers)]
    shown = [r for r in rounds if r >= min(cut + rounds[-3:])]
    short = {n: n.removesuffix(".weight") for n in layers}
    header = ["round", "remaining", "kept (replicate 0)", *(f"replicate {i}" for i in range(len(roots)))]
    lines = [
        "Units cut off (output units keeping no weight / units, in the smallest layer and the output layer) and "
        "the ticket's test accuracy:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in shown:
        m0 = masks[0, r]
        kept = ", ".join(f"{short[n]} {int(m0[n].sum())}/{m0[n].numel()}" for n in layers)
        cells = []
        for i, root in enumerate(roots):
            units = ", ".join(f"{short[n]} {dead[i, r][n]}/{masks[i, r][n].shape[0]}" for n in layers)
            accuracy = read_metrics(level_dir(root, r))["test_at_early_stop"]["accuracy"]
            cells.append(f"{units} · {100 * accuracy:.2f}")
        remaining = 100 * float(m0.density())
        lines.append(f"| {r} | {remaining:.2f}% | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder holding one run folder per recipe (runs/lth_course)")
    args = parser.parse_args()
    names = sorted(d for d in os.listdir(args.root) if os.path.isdir(os.path.join(args.root, d)))
    runs = [name for name in names if has_finished_levels(os.path.join(args.root, name))]
    for name in sorted(set(names) - set(runs)):
        print(f"{args.root}/{name}: skipped, no finished level in it", file=sys.stderr)
    if not runs:
        raise SystemExit(f"{args.root}: no run folders (each a recipe's output_dir with finished levels)")
    for name in runs:
        print(run_tables(name, os.path.join(args.root, name)))


if __name__ == "__main__":
    main()
