"""Export the ticket of an IMP run: the sparsest level within tolerance of dense, with a card that shows the run."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional

from ..cards import upsert_card_section
from .layout import ACCURACY_PLOT, EARLY_STOP_PLOT, level_dir, read_metrics
from .report import score, write_report

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer

TICKET_DIR = "ticket"


def choose_level(report: dict) -> int:
    """The sparsest winning ticket, or the sparsest level when none is within tolerance of dense."""
    if report["winning_ticket_levels"]:
        return max(report["winning_ticket_levels"])
    return max(row["level"] for row in report["trunk"])


def lottery_section(report: dict, chosen: int, command: Optional[str]) -> str:
    rows = ["| level | remaining weights | accuracy | early-stop step |", "|---|---|---|---|"]
    for row in report["trunk"]:
        acc = score(row)[0]
        mark = " ← this checkpoint" if row["level"] == chosen else ""
        rows.append(
            f"| {row['level']}{mark} | {row['remaining_weights_pct']:.2f}% | "
            f"{'n/a' if acc is None else f'{acc:.4f}'} | {row.get('early_stop_step', 'n/a')} |"
        )
    for kind, control_rows in report["controls"].items():
        for row in control_rows:
            acc = score(row)[0]
            rows.append(
                f"| {kind} @ level {row['trunk_level']} | {row['remaining_weights_pct']:.2f}% | "
                f"{'n/a' if acc is None else f'{acc:.4f}'} | {row.get('early_stop_step', 'n/a')} |"
            )
    made_by = f"\nProduced by:\n\n```bash\n{command}\n```\n" if command else ""
    return (
        "## Lottery-ticket run\n\n"
        f"Iterative magnitude pruning; accuracy is `{report['scored_by']}`. Dense accuracy: "
        f"{report['dense_accuracy']}. Levels within {report['tolerance']} of dense (winning tickets): "
        f"{report['winning_ticket_levels'] or 'none'}.\n\n"
        + "\n".join(rows)
        + f"\n\n![accuracy vs remaining weights]({ACCURACY_PLOT})\n\n![early-stop step]({EARLY_STOP_PLOT})\n"
        + made_by
    )


def export_ticket(
    root: str, trainer: Optional["LotteryTrainer"] = None, level: Optional[int] = None, command: Optional[str] = None
) -> str:
    """Copy the chosen level to `<root>/ticket/` with the run's plots and a card section; return that folder."""
    report = write_report(root)
    chosen = choose_level(report) if level is None else int(level)
    source = level_dir(root, chosen)
    if not os.path.isdir(source):
        raise ValueError(f"level {chosen} of {root!r} is not finished: choose one of the level_NN folders there.")
    destination = os.path.join(root, TICKET_DIR)
    tmp = destination + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for plot in (ACCURACY_PLOT, EARLY_STOP_PLOT):
        if os.path.isfile(os.path.join(root, plot)):
            shutil.copy2(os.path.join(root, plot), os.path.join(tmp, plot))
    # the command that produced the chosen level's weights (recorded when it was trained), not this call's
    command = read_metrics(source).get("produced_by") or command
    upsert_card_section(tmp, "lottery", lottery_section(report, chosen, command))
    if os.path.isdir(destination):
        shutil.rmtree(destination)
    os.replace(tmp, destination)
    return destination
