"""Lottery-ticket experiments: one IMP level loop (`LotteryRunner`) for trunk, controls and replicates, on the
Trainer backend or the lockstep backend, and the run report."""

from .batched import BatchedMaskedTraining
from .layout import CONTROL_KINDS
from .report import write_report, write_run_report
from .runner import BACKENDS, LotteryRunner, RunSummary, run_controls, run_experiment

__all__ = [
    "BACKENDS",
    "BatchedMaskedTraining",
    "CONTROL_KINDS",
    "LotteryRunner",
    "RunSummary",
    "run_controls",
    "run_experiment",
    "write_report",
    "write_run_report",
]
