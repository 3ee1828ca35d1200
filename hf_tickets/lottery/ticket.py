"""Export the ticket of an IMP run: the sparsest level within tolerance of dense, with a card that shows the run."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional, Sequence

from ..cards import card_from_folder, upsert_card_section
from .layout import ACCURACY_PLOT, EARLY_STOP_PLOT, level_dir, read_metrics
from .report import ARM_LABELS, rewind_label, score, write_report

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer

TICKET_DIR = "ticket"


def choose_level(report: dict) -> int:
    """The sparsest winning ticket, or the sparsest level when none is within tolerance of dense."""
    if report["winning_ticket_levels"]:
        return max(report["winning_ticket_levels"])
    return max(row["level"] for row in report["trunk"])


def lottery_section(report: dict, chosen: int, command: Optional[str] = None) -> str:
    """The card's lottery section: every level and control, the plots, the rewind point (the command that produced
    the checkpoint is the card's `command` section)."""
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
    dense = report["dense_accuracy"]
    controls = [ARM_LABELS.get(kind, kind).removeprefix("control: ") for kind in report["controls"]]
    return (
        "## Lottery-ticket run\n\n"
        f"Iterative magnitude pruning, {rewind_label(report['trunk'])} after each pruning step; accuracy is "
        f"`{report['scored_by']}`. Dense accuracy: {'n/a' if dense is None else f'{dense:.4f}'}. Levels within "
        f"{report['tolerance']} of dense (winning tickets): {report['winning_ticket_levels'] or 'none'}. "
        f"Controls: {'; '.join(controls) if controls else 'none were run'}.\n\n"
        + "\n".join(rows)
        + f"\n\n![accuracy vs remaining weights]({ACCURACY_PLOT})\n\n![early-stop step]({EARLY_STOP_PLOT})\n"
    )


def export_ticket(
    root: str,
    trainer: Optional["LotteryTrainer"] = None,
    level: Optional[int] = None,
    command: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
) -> str:
    """Copy the chosen level to `<root>/ticket/` with the run's plots and a card section; return that folder.

    `datasets`, `license` and `base_model` go into the card's metadata (a recipe's `ticket:` section sets them;
    `hf-tickets run` fills `datasets` from `data.name` when it is a Hub data set)."""
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
    upsert_card_section(tmp, "lottery", lottery_section(report, chosen))
    # sparsity, evaluation (this level's metrics.json), the command that produced the level's weights (recorded when
    # it was trained, not this call's) and the Hub metadata, rebuilt from the folder's own files
    if not read_metrics(source).get("produced_by") and command:
        from ..cards import command_markdown

        upsert_card_section(tmp, "command", command_markdown(command))
    card_from_folder(
        tmp,
        datasets=list(datasets) if isinstance(datasets, (list, tuple)) else [datasets] if datasets else None,
        license=license,
        base_model=base_model,
    )
    if os.path.isdir(destination):
        shutil.rmtree(destination)
    os.replace(tmp, destination)
    return destination
