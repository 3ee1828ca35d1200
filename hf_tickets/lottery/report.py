"""The run report: imp_report.json and two plots, rebuilt from the level folders of a trunk and its controls."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from .layout import CONTROL_KINDS, control_dir
from .levels import METRICS_NAME

REPORT_NAME = "imp_report.json"
ACCURACY_PLOT = "imp_accuracy.png"
EARLY_STOP_PLOT = "imp_early_stop.png"


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


def write_report(root: str, tolerance: float = 0.01) -> dict[str, Any]:
    """Summarise a trunk (and controls next to it) into `<root>/imp_report.json` and the PNG plots.

    Args:
        tolerance: a level is in the winning-ticket range when its accuracy is at least dense accuracy - tolerance.
    """
    trunk = _levels(root)
    controls = {kind: _levels(control_dir(root, kind)) for kind in CONTROL_KINDS}
    dense = next((row for row in trunk if row.get("level") == 0), None)
    dense_score = score(dense)[0] if dense else None
    winning = []
    if dense_score is not None:
        winning = [row["level"] for row in trunk if (score(row)[0] or -1.0) >= dense_score - tolerance]
    gaps = {}
    reinit_by_level = {row.get("trunk_level"): row for row in controls["reinit"]}
    for row in trunk:
        other = reinit_by_level.get(row.get("level"))
        if other is not None and score(row)[0] is not None and score(other)[0] is not None:
            gaps[str(row["level"])] = score(row)[0] - score(other)[0]
    report = {
        "dense_accuracy": dense_score,
        "scored_by": score(dense)[1] if dense else "none",
        "tolerance": tolerance,
        "winning_ticket_levels": winning,
        "sparsest_winning_ticket_remaining_pct": min(
            (row["remaining_weights_pct"] for row in trunk if row["level"] in winning), default=None
        ),
        "rewind_vs_reinit_gap": gaps,
        "trunk": trunk,
        "controls": {kind: rows for kind, rows in controls.items() if rows},
    }
    tmp = os.path.join(root, REPORT_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(root, REPORT_NAME))
    if trunk:
        plot_report(report, root)
    return report


def plot_report(report: dict, root: str) -> None:
    """Accuracy vs remaining weights (log x; trunk, controls, dense line) and early-stop step vs remaining weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"IMP (rewind)": report["trunk"], **{f"control: {k}": v for k, v in report["controls"].items()}}
    for filename, key, ylabel in (
        (ACCURACY_PLOT, "accuracy", f"accuracy ({report['scored_by']})"),
        (EARLY_STOP_PLOT, "early_stop_step", "early-stop step (min validation loss)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted = False
        for label, rows in series.items():
            points = []
            for row in rows:
                y = score(row)[0] if key == "accuracy" else row.get("early_stop_step")
                if y is not None:
                    points.append((row["remaining_weights_pct"], y))
            if points:
                points.sort(reverse=True)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                plotted = True
        if key == "accuracy" and report["dense_accuracy"] is not None:
            ax.axhline(report["dense_accuracy"], color="gray", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("remaining weights (%)")
        ax.set_ylabel(ylabel)
        if plotted:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        tmp = os.path.join(root, filename + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, os.path.join(root, filename))
