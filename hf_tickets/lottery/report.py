"""The run report: imp_report.json and two plots, rebuilt from the level folders of a trunk and its controls.

A run with replicates gets one report per replicate (in its folder) and, at the run's root, one that gives each
level's mean and spread over the replicates for the ticket and each control (`aggregate_replicates`).

Two judgements are made here and nowhere else: which levels are winning tickets (`winning_ticket_levels`: pruned
levels within `tolerance` of the dense level 0, which is the reference and never a ticket itself), and whether the
ticket beats a control by more than the evaluation split's noise (`margin_over_control`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from .layout import (
    ACCURACY_PLOT,
    CONTROL_KINDS,
    EARLY_STOP_PLOT,
    METRICS_NAME,
    RUN_REPORT_NAME,
    control_dir,
    replicate_roots,
    write_json_atomic,
)


def _levels(root: str) -> list[dict]:
    rows = []
    if not os.path.isdir(root):
        return rows
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, METRICS_NAME)
        if name.startswith("level_") and name[6:].isdigit() and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                rows.append(json.load(fh))
    return rows


def score(metrics: dict) -> tuple[Optional[float], str]:
    """The number a level is judged by: test accuracy at the early-stop step, else validation accuracy."""
    for section in ("test_at_early_stop", "final_test", "best_eval", "final_eval"):
        values = metrics.get(section) or {}
        if "accuracy" in values:
            return float(values["accuracy"]), f"{section}.accuracy"
    return None, "none"


def winning_ticket_levels(scores: Mapping[int, Optional[float]], tolerance: float) -> list[int]:
    """The report's definition of a winning ticket: a pruned level whose score is at least the dense level's minus
    `tolerance`. Level 0 is the dense network the others are judged against, so it is never listed; without a dense
    score nothing is. Levels without a score are not tickets.

    Args:
        scores: score per IMP level (level 0 = dense), e.g. test accuracy at the early-stop step.
        tolerance: how far below dense a ticket may score (0.01 = one accuracy point).
    """
    dense = scores.get(0)
    if dense is None:
        return []
    return sorted(
        level for level, value in scores.items() if level > 0 and value is not None and value >= dense - tolerance
    )


# Two-sided 95%: the margin must exceed 1.96 standard errors of the difference of two accuracies.
NOISE_Z = 1.96


def margin_over_control(ticket: float, control: float, n: Optional[int], z: float = NOISE_Z) -> dict[str, Any]:
    """How far the ticket's accuracy is above a control's, and whether that is more than the evaluation split's noise.

    Why this criterion: both accuracies are measured on the same `n` examples, so each carries a binomial error of
    sqrt(p(1-p)/n). The margin counts as real when it exceeds `z` standard errors of the difference of two independent
    proportions, sqrt(p_t(1-p_t)/n + p_c(1-p_c)/n) (a two-proportion z-test; treating the two models' errors as
    independent overstates the noise of a paired comparison, so the test is conservative).

    Args:
        ticket, control: accuracies in [0, 1].
        n: examples in the split both were scored on; None when unknown (then only the points are given).
        z: standard errors required (1.96: two-sided 95%).

    Returns:
        `points` (ticket - control, in accuracy points), and with `n`: `examples` (the difference in examples),
        `needed_examples` (the smallest whole number of examples beyond the noise), `n` and `beyond_noise`.
    """
    out: dict[str, Any] = {"points": 100.0 * (ticket - control)}
    if n is None or n <= 0:
        return out
    se = math.sqrt((ticket * (1 - ticket) + control * (1 - control)) / n)
    out.update(
        examples=int(round((ticket - control) * n)),
        needed_examples=int(math.floor(z * se * n)) + 1,
        n=int(n),
        beyond_noise=bool(ticket - control > z * se),
    )
    return out


def scored_split(scored_by: str) -> str:
    """The split a report's `scored_by` (see `score`) refers to: "test" or "validation"."""
    return "test" if scored_by.startswith(("test", "final_test")) else "validation"


def scored_split_size(rows: list[dict], scored_by: str) -> Optional[int]:
    """Examples in the split the levels were scored on, from the data record every level's metrics carry
    (`data.splits`); None when no level records it."""
    split = scored_split(scored_by)
    for row in rows:
        size = ((row.get("data") or {}).get("splits") or {}).get(split)
        if isinstance(size, int) and size > 0:
            return size
    return None


def control_margins(
    ticket_scores: Mapping[int, Optional[float]],
    control_scores: Mapping[str, Mapping[int, Optional[float]]],
    n: Optional[int],
) -> dict[str, dict[str, dict[str, Any]]]:
    """`margin_over_control` of the ticket over each control at every level where both have a score, keyed by level
    (as a string, like the JSON) then control kind."""
    margins: dict[str, dict[str, dict[str, Any]]] = {}
    for level in sorted(ticket_scores):
        ticket = ticket_scores[level]
        for kind, by_level in control_scores.items():
            control = by_level.get(level)
            if ticket is not None and control is not None:
                margins.setdefault(str(level), {})[kind] = margin_over_control(ticket, control, n)
    return margins


def summary_lines(report: dict, last_levels: int = 2) -> list[str]:
    """The end of a run's summary in words: the winning-ticket levels by `winning_ticket_levels` (the dense level 0
    excluded), and the ticket's margin over each control at the last `last_levels` levels that have controls, in
    examples of the scored split with the margin `margin_over_control` needs to be beyond that split's noise."""
    levels = report.get("winning_ticket_levels") or []
    lines = [
        f"winning-ticket levels (pruned levels within {report['tolerance']:g} of the dense level 0's accuracy): "
        + (", ".join(map(str, levels)) if levels else "none")
    ]
    margins = report.get("control_margins") or {}
    shown = sorted(margins, key=int)[-last_levels:] if last_levels > 0 else []
    if not shown:
        return lines
    remaining = {
        row["level"]: row["remaining_weights_pct"] for row in report.get("trunk") or report.get("levels") or []
    }
    n = next((m["n"] for level in shown for m in margins[level].values() if "n" in m), None)
    split = scored_split(str(report.get("scored_by", "")))
    lines.append(
        f"ticket minus control at the last levels, in examples of the {n}-example {split} split (beyond noise: "
        f"more than {NOISE_Z} standard errors of the difference, two-proportion z-test):"
        if n
        else "ticket minus control at the last levels, in accuracy points (split size not recorded):"
    )
    for level in shown:
        cells = []
        for kind, m in margins[level].items():
            if "examples" in m:
                verdict = "beyond noise" if m["beyond_noise"] else "within noise"
                cells.append(f"{kind} {m['examples']:+d} ({verdict}: >= +{m['needed_examples']} needed)")
            else:
                cells.append(f"{kind} {m['points']:+.2f} points")
        left = remaining.get(int(level))
        where = f"level {int(level):>2}" + (f" ({left:.2f}% of weights left)" if left is not None else "")
        lines.append(f"  {where}: " + ", ".join(cells))
    return lines


def write_report(root: str, tolerance: float = 0.01) -> dict[str, Any]:
    """Summarise a trunk (and controls next to it) into `<root>/imp_report.json` and the PNG plots.

    Args:
        tolerance: a pruned level is a winning ticket when its accuracy is at least dense accuracy - tolerance (the
            dense level itself is not a ticket; see `winning_ticket_levels`).
    """
    trunk = _levels(root)
    controls = {kind: _levels(control_dir(root, kind)) for kind in CONTROL_KINDS}
    dense = next((row for row in trunk if row.get("level") == 0), None)
    dense_score = score(dense)[0] if dense else None
    scored_by = score(dense)[1] if dense else "none"
    ticket_scores = {row["level"]: score(row)[0] for row in trunk}
    winning = winning_ticket_levels(ticket_scores, tolerance)
    control_scores = {kind: {row.get("trunk_level"): score(row)[0] for row in rows} for kind, rows in controls.items()}
    gaps = {}
    reinit_by_level = {row.get("trunk_level"): row for row in controls["reinit"]}
    for row in trunk:
        other = reinit_by_level.get(row.get("level"))
        if other is not None and score(row)[0] is not None and score(other)[0] is not None:
            gaps[str(row["level"])] = score(row)[0] - score(other)[0]
    report = {
        "dense_accuracy": dense_score,
        "scored_by": scored_by,
        "tolerance": tolerance,
        "winning_ticket_levels": winning,
        "sparsest_winning_ticket_remaining_pct": min(
            (row["remaining_weights_pct"] for row in trunk if row["level"] in winning), default=None
        ),
        "rewind_vs_reinit_gap": gaps,
        "control_margins": control_margins(ticket_scores, control_scores, scored_split_size(trunk, scored_by)),
        "trunk": trunk,
        "controls": {kind: rows for kind, rows in controls.items() if rows},
    }
    write_json_atomic(os.path.join(root, RUN_REPORT_NAME), report)
    if trunk:
        plot_report(report, root)
    return report


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(len(arr)),
    }


def percent_text(value: Optional[Mapping[str, Any]]) -> str:
    """A `spread` of accuracies as a table cell in percent: "mean ± std", or the value alone for one replicate."""
    if not value:
        return ""
    if value["n"] == 1:
        return f"{100 * value['mean']:.2f}"
    return f"{100 * value['mean']:.2f} ± {100 * value['std']:.2f}"


def aggregate_replicates(reports: list[dict], tolerance: float = 0.01) -> dict[str, Any]:
    """One report over replicate reports: per level, mean and spread of the ticket's and each control's score.

    Winning-ticket levels are judged on the means (`winning_ticket_levels`: a pruned level whose mean is within
    `tolerance` of the dense level's mean), and so are the margins over the controls (`control_margins`)."""
    arms: dict[str, dict[int, list[dict]]] = {"ticket": {}}
    for report in reports:
        for row in report["trunk"]:
            arms["ticket"].setdefault(row["level"], []).append(row)
        for kind, rows in report["controls"].items():
            for row in rows:
                arms.setdefault(kind, {}).setdefault(row["trunk_level"], []).append(row)
    levels = []
    for level in sorted(arms["ticket"]):
        entry: dict[str, Any] = {"level": level}
        for arm, by_level in arms.items():
            rows = by_level.get(level, [])
            scores = [score(row)[0] for row in rows if score(row)[0] is not None]
            if scores:
                entry[arm] = spread(scores)
            if arm == "ticket" and rows:
                entry["remaining_weights_pct"] = spread([row["remaining_weights_pct"] for row in rows])["mean"]
                stops = [row["early_stop_step"] for row in rows if row.get("early_stop_step") is not None]
                if stops:
                    entry["early_stop_step"] = spread(stops)
        levels.append(entry)
    dense = next((e["ticket"]["mean"] for e in levels if e["level"] == 0 and "ticket" in e), None)
    means = {arm: {e["level"]: e[arm]["mean"] for e in levels if arm in e} for arm in arms}
    scored_by = reports[0]["scored_by"] if reports else "none"
    n = scored_split_size([row for report in reports for row in report["trunk"]], scored_by)
    return {
        "replicates": len(reports),
        "scored_by": scored_by,
        "tolerance": tolerance,
        "dense_accuracy": dense,
        "winning_ticket_levels": winning_ticket_levels(means["ticket"], tolerance),
        "control_margins": control_margins(means["ticket"], {k: v for k, v in means.items() if k != "ticket"}, n),
        "levels": levels,
    }


def write_run_report(output_dir: str, last_run: Optional[dict] = None, tolerance: float = 0.01) -> dict[str, Any]:
    """Reports of a whole run: each replicate's, and with several replicates their aggregate at `output_dir`.

    Returns the report at `output_dir` (the single trunk's, or the aggregate). `last_run` (which arms this call
    trained and reused) is recorded in it."""
    roots = replicate_roots(output_dir)
    reports = [write_report(root, tolerance) for root in roots]
    if roots == [output_dir]:
        report = reports[0]
    else:
        report = aggregate_replicates(reports, tolerance)
        report["replicate_dirs"] = roots
        plot_aggregate(report, output_dir)
    if last_run is not None:
        report["last_run"] = last_run
    write_json_atomic(os.path.join(output_dir, RUN_REPORT_NAME), report)
    return report


def levels_report(output_dir: str, tolerance: float = 0.01) -> dict[str, Any]:
    """`write_run_report`'s report in the replicates' form (per level, mean and spread of each arm), also for a run
    of one replicate (n = 1): what tables over runs of either kind read."""
    report = write_run_report(output_dir, tolerance=tolerance)
    return report if "levels" in report else aggregate_replicates([report], tolerance)


def plot_aggregate(report: dict, root: str) -> None:
    """Accuracy vs remaining weights with mean and standard deviation over replicates, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {
        "ticket": "IMP ticket (rewind)",
        "reinit": "control: same masks, random re-initialization",
        "random_prune": "control: random pruning, same layer sizes",
    }
    for arm, label in labels.items():
        points = [(e["remaining_weights_pct"], e[arm]) for e in report["levels"] if arm in e]
        if points:
            points.sort(key=lambda p: -p[0])
            ax.errorbar(
                [p[0] for p in points],
                [100 * p[1]["mean"] for p in points],
                yerr=[100 * p[1]["std"] for p in points],
                marker="o",
                capsize=3,
                label=label,
            )
    if report["dense_accuracy"] is not None:
        ax.axhline(100 * report["dense_accuracy"], color="gray", linestyle="--", label="dense (mean)")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("remaining weights (% of the prunable weights, log scale)")
    ax.set_ylabel(f"accuracy (%), mean ± std over {report['replicates']} replicates")
    ax.set_title("Lottery tickets vs controls")
    ax.grid(True, which="both", alpha=0.3)
    # Inside the axes, bottom left: accuracy is high where most weights remain, so that corner is empty (a legend
    # outside the axes was cut off at these fixed margins).
    if ax.get_legend_handles_labels()[0]:  # a run without accuracy (no compute_metrics) has nothing to label
        ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)  # fixed margins: tight_layout is most of a plot
    tmp = os.path.join(root, ACCURACY_PLOT + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, os.path.join(root, ACCURACY_PLOT))


ARM_LABELS = {
    "reinit": "control: same masks, random re-initialization",
    "random_prune": "control: random pruning, same layer sizes",
}


def rewind_label(rows: list[dict]) -> str:
    """Where the IMP trunk was rewound to, in words (from its levels' metrics)."""
    row = next((r for r in rows if r.get("level", 0) > 0), rows[0] if rows else {})
    mode, k = row.get("rewind"), row.get("rewind_step_k")
    if mode == "init":
        return "rewound to initialization"
    if mode == "step" and k is not None:
        return f"rewound to step {k}"
    if mode == "lr" and k is not None:
        return f"learning rate rewound to step {k}"
    if mode == "none":
        return "fine-tuned, no rewind"
    return f"rewind: {mode}" if mode else "rewind point unknown"


def plot_report(report: dict, root: str) -> None:
    """Accuracy (%) vs remaining weights (%, log x) for the trunk, both controls and the dense level, and the early-
    stop step vs remaining weights; titled, labelled in words, legends outside the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trunk_label = f"IMP ticket ({rewind_label(report['trunk'])})"
    series = {
        trunk_label: report["trunk"],
        **{ARM_LABELS.get(k, f"control: {k}"): v for k, v in report["controls"].items()},
    }
    scored_by = report["scored_by"].replace("_", " ").replace(".", ", ")
    for filename, key, ylabel, title in (
        (ACCURACY_PLOT, "accuracy", f"accuracy (%; {scored_by})", "Accuracy vs remaining weights"),
        (
            EARLY_STOP_PLOT,
            "early_stop_step",
            "early-stop step (minimum validation loss)",
            "Early-stop step vs remaining weights",
        ),
    ):
        fig, ax = plt.subplots(figsize=(8.5, 4.2))
        plotted = False
        for label, rows in series.items():
            points = []
            for row in rows:
                y = score(row)[0] if key == "accuracy" else row.get("early_stop_step")
                if y is not None:
                    points.append((row["remaining_weights_pct"], 100 * y if key == "accuracy" else y))
            if points:
                points.sort(reverse=True)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                plotted = True
        if key == "accuracy" and report["dense_accuracy"] is not None:
            ax.axhline(100 * report["dense_accuracy"], color="gray", linestyle="--", label="dense network (level 0)")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({round(r["remaining_weights_pct"], 1) for r in report["trunk"]}))
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if key == "accuracy":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.set_xlabel("remaining weights (% of the prunable weights, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if plotted:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        tmp = os.path.join(root, filename + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, os.path.join(root, filename))
