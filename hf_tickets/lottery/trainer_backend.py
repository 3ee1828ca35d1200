"""The Trainer backend: trains a level's arms one at a time, each one `Trainer.train` run of the `TicketTrainer`.

Every Trainer feature works (callbacks, mixed precision, accumulation, distributed launch, checkpoints). A level is
trained in its `.partial` folder, where Trainer's checkpoints land, and published when done. A process killed at
any moment restarts without training a step twice and ends with what an uninterrupted run ends with:

- it resumes from the newest *complete* checkpoint (`last_complete_checkpoint`);
- a checkpoint at the level's last step is finished from, not resumed (Trainer would train one step more);
- the level's metrics come from its whole evaluation history (`level_start.json` records where the level's own
  log entries begin) and its mean train loss from every step it trained (kept in each checkpoint);
- a rewind point lost between `checkpoint-k` and its copy is copied again from `checkpoint-k`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import TYPE_CHECKING, Callable, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, set_seed

from ..checkpoints import last_complete_checkpoint
from ..files import TRAINING_ARGS_NAME, read_json
from .arms import Arm, load_into_, start_digest
from .layout import LEVEL_START_NAME, PARTIAL_SUFFIX, publish_level, write_json_atomic
from .metrics import level_metrics, rows_from_log_history
from .rewind import SCHEDULER_NAME, TRAINER_STATE_NAME, RewindCapture, copy_checkpoint

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer

logger = logging.getLogger(__name__)


class LevelStartCallback(TrainerCallback):
    """At train begin: load the arm's start weights, apply its masks, zero pruned entries of optimizer state.

    Runs after the Trainer restored a checkpoint (on_train_begin comes after optimizer/scheduler loading), so a
    late-rewound arm starts from the rewind point's state with its own, smaller mask. The weights of a resumed
    checkpoint are loaded again here by name (`load_saved_weights`): Trainer's own loading skips every tensor a
    transformers 5 model saves under another name (ViT), and would leave the level's previous weights in place.
    """

    def __init__(self, trainer: "LotteryTrainer", sources: list[str], partial: str) -> None:
        self.trainer = trainer
        self.sources = sources  # folders / files, loaded in order
        self.partial = partial
        self.first_start = True  # False when resuming the level from one of its own checkpoints
        self.expected_digest: Optional[str] = None  # the start the runner planned; None: not checked
        self.on_start: list[Callable[[], None]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        for source in self.sources:
            load_into_(model, source)
        self.trainer.sparsity_callback.enforce_now(kwargs.get("optimizer") or self.trainer.optimizer)
        if self.first_start and args.should_save:
            write_json_atomic(
                os.path.join(self.partial, LEVEL_START_NAME),
                {"inherited_log_entries": len(state.log_history), "start_step": state.global_step},
            )
        if self.expected_digest is not None and start_digest(model) != self.expected_digest:
            raise RuntimeError(
                "the arm does not start from the weights the lottery runner planned (start_weights_sha256 differs): "
                "its rewind point or initial weights changed on disk since the run began."
            )
        for hook in self.on_start:
            hook()


class LevelLoss(TrainerCallback, ExportableState):
    """The sum of a level's per-step losses, saved in every checkpoint, so that a resumed level's mean train loss
    covers all its steps (Trainer's own `train_loss` counts only the steps after a resume)."""

    def __init__(self, trainer: "LotteryTrainer", restore: bool) -> None:
        self.trainer = trainer
        self.restore = restore
        self.total: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().to(self.total.device, torch.float64)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if self.restore else None
        value = float(saved["attributes"]["loss_sum"]) if saved else 0.0
        self.total = torch.tensor(value, dtype=torch.float64, device=args.device)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"loss_sum": float(self.total) if self.total is not None else 0.0}}


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
        if arm.capture_rewind_point is not None:
            self._recover_rewind_point(arm, partial)
        # a crash mid-level resumes where it stopped (from the last checkpoint Trainer finished writing)
        checkpoint = last_complete_checkpoint(partial)
        resume = checkpoint or arm.rewind_point
        hook = LevelStartCallback(trainer, [], partial)
        loss = LevelLoss(trainer, restore=checkpoint is not None)
        callbacks: list = [hook, loss]
        if arm.capture_rewind_point is not None:
            callbacks.append(RewindCapture(arm.capture_step, arm.capture_rewind_point))
        if checkpoint is not None:  # it holds the weights to go on from (a peft model's: its adapters)
            hook.sources = [p for p in (arm.base_weights, checkpoint) if p is not None]
            hook.first_start = False
        else:
            hook.sources = arm.start_sources()
            identity = arm.extra_metrics.get("identity", {})
            # planned on the full weights before FSDP2 sharded the model (level 0): a sharded digest cannot match it
            if identity.get("start_weights_digest") == "fsdp2 shards" or not _will_shard(trainer):
                hook.expected_digest = identity.get("start_weights_sha256")
        added: list = []
        try:
            trainer.args.output_dir = partial
            for name, value in overrides.items():
                setattr(trainer.args, name, value)
            trainer.set_masks(arm.masks)
            trainer.loss_observer = loss.observe
            trainer.card_charts = False  # level cards without the per-layer chart; export_ticket draws it
            if checkpoint is not None and _step_of(checkpoint) >= self.total_steps():
                last_lr = self._finish_from(checkpoint, hook, loss)  # the level ended; only publishing was lost
            else:
                if resume is None:
                    set_seed(arm.seed)  # every level sees the same data order and dropout as level 0
                for cb in callbacks:
                    trainer.add_callback(cb)
                    added.append(cb)
                trainer.optimizer, trainer.lr_scheduler = None, None  # fresh, or restored from `resume`
                trainer.train_once(resume_from_checkpoint=resume, restore_masks=False)  # masks: this arm's
                last_lr = float(trainer.lr_scheduler.get_last_lr()[0]) if trainer.lr_scheduler is not None else None
            trainer.save_model(partial)
            start = read_json(os.path.join(partial, LEVEL_START_NAME))
            entries = trainer.state.log_history[start["inherited_log_entries"] :]
            history = rows_from_log_history(entries, trainer.eval_dataset)
            steps = trainer.state.global_step
            train_loss = float(loss.total) / max(steps - start["start_step"], 1)
            metrics = level_metrics(arm.masks, history, train_loss, steps)
            if last_lr is not None:
                metrics["last_learning_rate"] = last_lr
            metrics.update(arm.extra_metrics, backend=self.name)
            # every rank has read level_start.json from the partial folder before the writer publishes (renames)
            # it: a rank slower out of save_model would otherwise find the folder gone
            trainer.accelerator.wait_for_everyone()
            if trainer.args.should_save:  # one process writes (DDP/FSDP: every rank trained the same level)
                write_json_atomic(os.path.join(partial, TRAINING_ARGS_NAME), json.loads(trainer.args.to_json_string()))
                publish_level(partial, arm.folder, metrics)
            trainer.accelerator.wait_for_everyone()
            return metrics
        finally:
            trainer.loss_observer = None
            trainer.card_charts = True
            for cb in added:
                trainer.remove_callback(cb)
            for name, value in saved_args.items():
                setattr(trainer.args, name, value)

    def _finish_from(self, checkpoint: str, hook: LevelStartCallback, loss: LevelLoss) -> Optional[float]:
        """A checkpoint at the level's last step: take its weights, state and loss sum instead of training on."""
        trainer = self.trainer
        trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        hook.on_train_begin(trainer.args, trainer.state, trainer.control)
        loss.on_train_begin(trainer.args, trainer.state, trainer.control)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            last = torch.load(scheduler, map_location="cpu", weights_only=True).get("_last_lr")
            return float(last[0]) if last else None
        return None

    def _recover_rewind_point(self, arm: Arm, partial: str) -> None:
        """Level 0 killed after `checkpoint-k` but before its copy: copy it now, or start level 0 over if it is gone
        (resuming past step k would never capture step k again)."""
        if os.path.isdir(arm.capture_rewind_point):
            return
        newest = last_complete_checkpoint(partial)
        if newest is None or _step_of(newest) < arm.capture_step:
            return
        at_k = os.path.join(partial, f"{PREFIX_CHECKPOINT_DIR}-{arm.capture_step}")
        if last_complete_checkpoint(partial, at_most=arm.capture_step) == at_k:
            if self.trainer.args.should_save:
                copy_checkpoint(at_k, arm.capture_rewind_point)
            self.trainer.accelerator.wait_for_everyone()
            return
        logger.warning("%s: the rewind point (step %d) is lost; training level 0 again.", arm.name, arm.capture_step)
        if self.trainer.args.should_save:
            for name in os.listdir(partial):
                if name.startswith(PREFIX_CHECKPOINT_DIR):
                    shutil.rmtree(os.path.join(partial, name))
        self.trainer.accelerator.wait_for_everyone()


def _will_shard(trainer: "LotteryTrainer") -> bool:
    """True when the trainer trains under FSDP2 (its model is or will be sharded by accelerate)."""
    from ..distributed import fsdp_version

    return fsdp_version(trainer.accelerator) == 2


def _step_of(checkpoint: str) -> int:
    return int(os.path.basename(os.path.normpath(checkpoint)).rsplit("-", 1)[1])
