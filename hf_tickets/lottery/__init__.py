"""Lottery-ticket experiments: the IMP level loop, its controls, and the run report."""

from .batched import BatchedMaskedTraining
from .controls import CONTROL_KINDS, run_control
from .report import write_report
from .runner import IMPRunner

__all__ = ["BatchedMaskedTraining", "CONTROL_KINDS", "IMPRunner", "run_control", "write_report"]
