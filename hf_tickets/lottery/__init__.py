"""Lottery-ticket experiments: the IMP level loop, its controls, and the run report."""

from .batched import BatchedMaskedTraining
from .controls import run_control
from .layout import CONTROL_KINDS
from .report import write_report
from .runner import IMPRunner

__all__ = ["BatchedMaskedTraining", "CONTROL_KINDS", "IMPRunner", "run_control", "write_report"]
