"""Training one level of a lottery-ticket run: start state, masks, atomic level folder, level metrics.

A level folder is written as `level_NN.partial/` (Trainer checkpoints land there too) and renamed to `level_NN/`
only when the level is complete, so a crash never leaves a half-written level and a restart knows where to go on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from safetensors.torch import load_model, save_model
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed

from ..checkpoints import last_complete_checkpoint
from ..masks import MaskSet

if TYPE_CHECKING:
    from ..trainer import TicketTrainer

METRICS_NAME = "metrics.json"
INIT_WEIGHTS_NAME = "init_weights.safetensors"
REWIND_DIR = "rewind_point"


def level_dir(root: str, level: int) -> str:
    return os.path.join(root, f"level_{level:02d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METRICS_NAME))


@dataclass
class LevelStart:
    """Where a level's training starts from.

    Attributes:
        resume_from: a Trainer checkpoint to resume (weights, optimizer, scheduler, RNG, data position), or None
            for a fresh start at step 0.
        weights_file: weights loaded into the model after the checkpoint (if any) was restored, before training.
        args_overrides: TrainingArguments fields changed for this level only (e.g. a constant LR to fine-tune).
    """

    resume_from: Optional[str] = None
    weights_file: Optional[str] = None
    args_overrides: dict = field(default_factory=dict)


class LevelStartCallback(TrainerCallback):
    """At train begin: load the level's start weights, apply its masks, zero pruned entries of optimizer state.

    Runs after the Trainer restored a checkpoint (on_train_begin comes after optimizer/scheduler loading), so a
    late-rewinding level starts from the rewind point's state with the new, smaller mask.
    """

    def __init__(self, trainer: "TicketTrainer") -> None:
        self.trainer = trainer
        self.weights_file: Optional[str] = None
        self.loaded_log_entries = 0
        self.on_start: list[Callable[[], None]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        if self.weights_file is not None:
            load_model(model, self.weights_file, strict=True, device=str(next(model.parameters()).device))
        self.trainer.sparsity_callback.enforce_now(kwargs.get("optimizer") or self.trainer.optimizer)
        self.loaded_log_entries = len(state.log_history)
        for hook in self.on_start:
            hook()


class RewindCapture(TrainerCallback):
    """Copies the Trainer checkpoint taken at step k of level 0 to `<root>/rewind_point` (a deep copy on disk)."""

    def __init__(self, step: int, destination: str) -> None:
        self.step = step
        self.destination = destination

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not os.path.isdir(self.destination):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and state.global_step == self.step and not os.path.isdir(self.destination):
            source = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.step}")
            tmp = self.destination + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            os.replace(tmp, self.destination)


def save_init_weights(model: torch.nn.Module, root: str, write: bool = True) -> str:
    """theta_0 on disk (safetensors), written once (by the writing process): the rewind target of rewind='init'."""
    path = os.path.join(root, INIT_WEIGHTS_NAME)
    if write and not os.path.isfile(path):
        os.makedirs(root, exist_ok=True)
        tmp = path + ".tmp"
        save_model(model, tmp)
        os.replace(tmp, path)
    return path


def train_level(
    trainer: "TicketTrainer",
    final_dir: str,
    masks: MaskSet,
    start: LevelStart,
    extra_metrics: Optional[dict] = None,
    extra_callbacks: tuple = (),
) -> dict:
    """Train one level into `final_dir` atomically and return its metrics (also written to metrics.json)."""
    partial = final_dir + ".partial"
    os.makedirs(partial, exist_ok=True)
    saved_args = {name: getattr(trainer.args, name) for name in ["output_dir", *start.args_overrides]}
    hook = LevelStartCallback(trainer)
    hook.weights_file = start.weights_file
    callbacks = [hook, *extra_callbacks]
    try:
        trainer.args.output_dir = partial
        for name, value in start.args_overrides.items():
            setattr(trainer.args, name, value)
        trainer.set_masks(masks)
        # a crash mid-level resumes where it stopped (from the last checkpoint Trainer finished writing)
        resume = last_complete_checkpoint(partial) or start.resume_from
        if resume is not None and resume != start.resume_from:
            hook.weights_file = None  # the mid-level checkpoint already holds the right weights
        if resume is None:
            set_seed(trainer.args.seed)  # every level sees the same data order and dropout as level 0
        for cb in callbacks:
            trainer.add_callback(cb)
        trainer.optimizer, trainer.lr_scheduler = None, None  # fresh, or restored from `resume`
        output = trainer.train_once(resume_from_checkpoint=resume, restore_masks=False)  # masks: this level's
        trainer.save_model(partial)
        entries = trainer.state.log_history[hook.loaded_log_entries :]
        metrics = level_metrics(trainer, masks, entries, output.training_loss)
        if trainer.lr_scheduler is not None:
            metrics["last_learning_rate"] = float(trainer.lr_scheduler.get_last_lr()[0])
        metrics.update(extra_metrics or {})
        if trainer.args.should_save:  # one process writes (DDP/FSDP: every rank trained the same level)
            _finish_level(partial, final_dir, metrics)
        trainer.accelerator.wait_for_everyone()
        return metrics
    finally:
        for cb in callbacks:
            trainer.remove_callback(cb)
        for name, value in saved_args.items():
            setattr(trainer.args, name, value)


def _finish_level(partial: str, final_dir: str, metrics: dict) -> None:
    """metrics.json, drop the level's Trainer checkpoints, then publish the folder with one rename."""
    tmp = os.path.join(partial, METRICS_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(partial, METRICS_NAME))
    for name in os.listdir(partial):
        if name.startswith(PREFIX_CHECKPOINT_DIR):
            shutil.rmtree(os.path.join(partial, name))
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.replace(partial, final_dir)


def _split_names(trainer: Trainer) -> tuple[str, Optional[str]]:
    """Metric-key prefixes of the validation and test sets: eval_dataset={"validation": ..., "test": ...}."""
    ds = trainer.eval_dataset
    if isinstance(ds, dict):
        names = list(ds)
        val = "validation" if "validation" in names else names[0]
        test = "test" if "test" in names and val != "test" else None
        return f"eval_{val}_", (f"eval_{test}_" if test else None)
    return "eval_", None


def level_metrics(trainer: Trainer, masks: MaskSet, entries: list[dict], train_loss: float) -> dict[str, Any]:
    """Sparsity, final/best validation metrics, early-stop step (min validation loss) and test metrics there."""
    val, test = _split_names(trainer)

    def pick(entry: dict, prefix: str) -> dict:
        skip = ("runtime", "per_second", "epoch")
        return {
            k[len(prefix) :]: v
            for k, v in entry.items()
            if k.startswith(prefix) and not any(s in k for s in skip) and isinstance(v, (int, float))
        }

    val_entries = [e for e in entries if f"{val}loss" in e]
    test_by_step = {e["step"]: pick(e, test) for e in entries if test and f"{test}loss" in e}
    report = masks.report()
    metrics: dict[str, Any] = {
        "level": masks.metadata.get("level"),
        "sparsity": report["sparsity"],
        "remaining_weights_pct": 100.0 * report["kept"] / max(report["numel"], 1),
        "kept": report["kept"],
        "numel": report["numel"],
        "train_loss": train_loss,
        "steps": trainer.state.global_step,
    }
    if val_entries:
        best = min(val_entries, key=lambda e: e[f"{val}loss"])
        metrics["final_eval"] = pick(val_entries[-1], val)
        metrics["best_eval"] = pick(best, val)
        metrics["early_stop_step"] = best["step"]
        if test_by_step:
            metrics["test_at_early_stop"] = test_by_step.get(best["step"], {})
            metrics["final_test"] = test_by_step[max(test_by_step)]
    return metrics
