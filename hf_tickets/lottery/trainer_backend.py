"""The Trainer backend: trains a level's arms one at a time, each one `Trainer.train` run of the `TicketTrainer`.

Every Trainer feature works (callbacks, mixed precision, accumulation, distributed launch, checkpoints). A level is
trained in its `.partial` folder, where Trainer's checkpoints land, so a run killed mid-level resumes from the last
complete checkpoint; the folder is published when the level is done (`layout.publish_level`).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable, Optional

from transformers import TrainerCallback
from transformers.trainer_utils import set_seed

from ..checkpoints import last_complete_checkpoint, load_saved_weights
from .arms import Arm, start_digest
from .layout import PARTIAL_SUFFIX, publish_level
from .metrics import level_metrics, rows_from_log_history
from .rewind import RewindCapture

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer


class LevelStartCallback(TrainerCallback):
    """At train begin: load the arm's start weights, apply its masks, zero pruned entries of optimizer state.

    Runs after the Trainer restored a checkpoint (on_train_begin comes after optimizer/scheduler loading), so a
    late-rewound arm starts from the rewind point's state with its own, smaller mask. The weights of a resumed
    checkpoint are loaded again here by name (`load_saved_weights`): Trainer's own loading skips every tensor a
    transformers 5 model saves under another name (ViT), and would leave the level's previous weights in place.
    """

    def __init__(self, trainer: "LotteryTrainer", sources: list[str]) -> None:
        self.trainer = trainer
        self.sources = sources  # folders / files, loaded in order
        self.loaded_log_entries = 0
        self.expected_digest: Optional[str] = None  # the start the runner planned; None: not checked
        self.on_start: list[Callable[[], None]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        from .lockstep import load_weights_

        model = self.trainer.model
        device = next(model.parameters()).device
        for source in self.sources:
            load_weights_(model, {k: v.to(device) for k, v in load_saved_weights(source, model).items()})
        self.trainer.sparsity_callback.enforce_now(kwargs.get("optimizer") or self.trainer.optimizer)
        self.loaded_log_entries = len(state.log_history)
        if self.expected_digest is not None and start_digest(model) != self.expected_digest:
            raise RuntimeError(
                "the arm does not start from the weights the lottery runner planned (start_weights_sha256 differs): "
                "its rewind point or initial weights changed on disk since the run began."
            )
        for hook in self.on_start:
            hook()


class TrainerBackend:
    """Trains arms with the `TicketTrainer` itself."""

    name = "trainer"

    def __init__(self, trainer: "LotteryTrainer") -> None:
        self.trainer = trainer

    def total_steps(self) -> int:
        """Optimizer steps in one level, as the Trainer will compute them."""
        args = self.trainer.args
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        batches = len(self.trainer.get_train_dataloader())
        per_epoch = max(batches // args.gradient_accumulation_steps, 1)
        return int(math.ceil(args.num_train_epochs * per_epoch))

    def train(self, arms: list[Arm]) -> list[dict]:
        return [self.train_arm(arm) for arm in arms]

    def train_arm(self, arm: Arm) -> dict:
        """Train one arm into its folder atomically and return its metrics (also written to metrics.json)."""
        trainer = self.trainer
        partial = arm.folder + PARTIAL_SUFFIX
        os.makedirs(partial, exist_ok=True)
        overrides = dict(arm.args_overrides, seed=arm.seed)
        saved_args = {name: getattr(trainer.args, name) for name in ["output_dir", *overrides]}
        hook = LevelStartCallback(trainer, [])
        callbacks: list = [hook]
        if arm.capture_rewind_point is not None:
            callbacks.append(RewindCapture(arm.capture_step, arm.capture_rewind_point))
        try:
            trainer.args.output_dir = partial
            for name, value in overrides.items():
                setattr(trainer.args, name, value)
            trainer.set_masks(arm.masks)
            # a crash mid-level resumes where it stopped (from the last checkpoint Trainer finished writing)
            resume = last_complete_checkpoint(partial) or arm.rewind_point
            if resume is not None and resume != arm.rewind_point:
                hook.sources = [resume]  # a mid-level checkpoint holds the weights to go on from
            else:
                hook.sources = [p for p in (arm.rewind_point, arm.weights_file) if p is not None]
                hook.expected_digest = arm.extra_metrics.get("identity", {}).get("start_weights_sha256")
            if resume is None:
                set_seed(arm.seed)  # every level sees the same data order and dropout as level 0
            for cb in callbacks:
                trainer.add_callback(cb)
            trainer.optimizer, trainer.lr_scheduler = None, None  # fresh, or restored from `resume`
            output = trainer.train_once(resume_from_checkpoint=resume, restore_masks=False)  # masks: this arm's
            trainer.save_model(partial)
            history = rows_from_log_history(trainer.state.log_history[hook.loaded_log_entries :], trainer.eval_dataset)
            metrics = level_metrics(arm.masks, history, output.training_loss, trainer.state.global_step)
            if trainer.lr_scheduler is not None:
                metrics["last_learning_rate"] = float(trainer.lr_scheduler.get_last_lr()[0])
            metrics.update(arm.extra_metrics, backend=self.name)
            if trainer.args.should_save:  # one process writes (DDP/FSDP: every rank trained the same level)
                publish_level(partial, arm.folder, metrics)
            trainer.accelerator.wait_for_everyone()
            return metrics
        finally:
            for cb in callbacks:
                trainer.remove_callback(cb)
            for name, value in saved_args.items():
                setattr(trainer.args, name, value)
