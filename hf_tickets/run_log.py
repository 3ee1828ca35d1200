"""Where a lottery run's console output goes: one line per finished arm-level, Trainer's per-step dicts to a file.

A 20-level recipe trains hundreds of arm-levels; Trainer's own console output (a step bar and a `{'loss': ...}`
line per logging step for every arm, a "Writing model shards" bar per save) buries the lines that say where the run
is. So, unless asked for (`hf-tickets run --log-steps`, or `set_console(step_logs=True)`):

- Trainer's per-step log dicts go to `<output_dir>/train_log.jsonl` (`STEP_LOG_NAME`), one JSON object a line with
  the arm's folder (`run/level_02`, `run.reinit/level_02`) and the step, instead of the console; the file is
  written either way;
- Trainer's step bar (`ProgressCallback` / `PrinterCallback`) is taken off the trainer for the run, and
  transformers' / huggingface_hub's progress bars (the save bars) are switched off, then restored;
- an optional bar over the whole run (arm-levels done of planned, `tqdm` as Trainer uses) is shown on a terminal
  only (`set_console(progress_bar=True)`, `hf-tickets run --progress`).

The settings are process-wide, like transformers' own logging verbosity.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .files import STEP_LOG_NAME

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass
class ConsoleOptions:
    """What a lottery run shows on the console besides its per-arm-level lines."""

    step_logs: bool = False  # Trainer's per-step dicts and step bars on the console as well as in the log file
    progress_bar: bool = False  # one bar over the run's arm-levels, shown only when stderr is a terminal


_OPTIONS = ConsoleOptions()


def set_console(step_logs: Optional[bool] = None, progress_bar: Optional[bool] = None) -> ConsoleOptions:
    """Change the process-wide console options (None keeps a setting); returns them."""
    if step_logs is not None:
        _OPTIONS.step_logs = bool(step_logs)
    if progress_bar is not None:
        _OPTIONS.progress_bar = bool(progress_bar)
    return _OPTIONS


def console_options() -> ConsoleOptions:
    return _OPTIONS


def _step_log_callback(path: str, root: str):
    """A TrainerCallback that appends every log dict (rank 0) to `path` as one JSON line."""
    from transformers import TrainerCallback

    class StepLogFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            # the arm's folder relative to the run's parent: run/level_03, run.reinit/level_03 (controls' folders)
            arm = os.path.relpath(str(args.output_dir), os.path.dirname(os.path.abspath(root)))
            row: dict[str, Any] = {"arm": arm.removesuffix(".partial"), "step": state.global_step}
            row.update((k, v) for k, v in logs.items() if k != "total_flos")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")

    return StepLogFile()


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's tqdm bars (e.g. "Writing model shards") off inside the block, unless
    the console options ask for step logs; the previous state is restored after."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if _OPTIONS.step_logs or not was_on:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextlib.contextmanager
def run_console(trainer, root: str) -> Iterator[None]:
    """For the duration of a lottery run: per-step log dicts into `<root>/train_log.jsonl`, and (unless step logs
    are asked for) Trainer's step bar and dict lines off the console."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    handler = trainer.callback_handler
    step_log = _step_log_callback(os.path.join(root, STEP_LOG_NAME), root)
    handler.add_callback(step_log)
    removed = []
    if not _OPTIONS.step_logs:
        for cls in (ProgressCallback, PrinterCallback):
            while (cb := handler.pop_callback(cls)) is not None:
                removed.append(cb)
    try:
        with quiet_progress_bars():
            yield
    finally:
        handler.remove_callback(step_log)
        for cb in removed:
            handler.add_callback(cb)


def run_bar(total: int, initial: int = 0) -> Optional["tqdm"]:
    """A bar over a run's arm-levels, or None when not asked for or stderr is not a terminal (a log file, CI)."""
    if not _OPTIONS.progress_bar or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="arm-level", desc="lottery run", dynamic_ncols=True)
