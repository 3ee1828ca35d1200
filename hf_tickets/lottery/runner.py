"""The IMP level loop: train -> prune (new mask inside the old) -> rewind -> train again, one folder per level.

Layout of a run (`TrainingArguments.output_dir`):

    init_weights.safetensors   theta_0, the rewind target of rewind="init" (and of the controls)
    rewind_point/              Trainer checkpoint at step k of level 0 (rewind="step"/"lr")
    level_00/ ... level_NN/    model.safetensors, masks.safetensors, metrics.json, README.md per level
    imp_report.json, imp_accuracy.png, imp_early_stop.png

The run is idempotent: finished levels are skipped, and a level interrupted mid-way resumes from its last
Trainer checkpoint, so a restarted run ends with the same masks as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from safetensors.torch import load_model

from ..masks import MaskSet
from .identity import check_identity, run_identity
from .levels import REWIND_DIR, LevelStart, RewindCapture, is_complete, level_dir, save_init_weights, train_level

if TYPE_CHECKING:
    from ..trainer import TicketTrainer


def planned_steps(trainer: "TicketTrainer") -> int:
    """Optimizer steps in one level, as the Trainer will compute them."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    return int(math.ceil(args.num_train_epochs * per_epoch))


class IMPRunner:
    """Runs every level of an IMP experiment with one `TicketTrainer`."""

    def __init__(self, trainer: "TicketTrainer") -> None:
        self.trainer = trainer
        self.config = trainer.sparsity_config
        self.root = trainer.args.output_dir
        self.method = trainer.sparsity_method

    def rewind_step(self) -> int:
        """k in optimizer steps; raises before any training when it cannot be reached."""
        total = planned_steps(self.trainer)
        k = self.config.rewind_step_for(total)
        if self.config.rewind in ("step", "lr") and k >= total:
            raise ValueError(
                f"SparsityConfig.rewind_step={self.config.rewind_step} is step {k}, at or past the end of training "
                f"({total} steps per level): choose a step below {total} or a fraction such as 0.05."
            )
        return k

    def validate(self) -> None:
        if self.trainer.args.load_best_model_at_end:
            raise ValueError(
                "TrainingArguments.load_best_model_at_end is not supported with an iterative method: each level must "
                "end with its last weights (the early-stop step is recorded in metrics.json instead)."
            )
        if getattr(self.trainer, "_user_optimizer", False):
            raise ValueError(
                "an iterative method re-creates the optimizer at every level: pass no `optimizers=` to TicketTrainer "
                "(use TrainingArguments.optim) so that rewinding can restore optimizer state."
            )
        self.rewind_step()

    def run(self):
        self.validate()
        cfg, trainer = self.config, self.trainer
        k = self.rewind_step()
        levels = cfg.num_levels()
        identity = run_identity(cfg, trainer.args, trainer.model, trainer.train_dataset)
        check_identity(self.root, identity, write=trainer.args.should_save)  # before anything is reused or trained
        init_file = save_init_weights(trainer.model, self.root, write=trainer.args.should_save)
        trainer.accelerator.wait_for_everyone()
        rewind_dir = os.path.join(self.root, REWIND_DIR)
        masks = trainer.masks
        output = None
        for level in range(levels + 1):
            final = level_dir(self.root, level)
            if is_complete(final):
                masks = MaskSet.load(final)
                continue
            if level > 0:
                masks = self._masks_after(level - 1, masks)
            start, callbacks = self._start(level, k, init_file, rewind_dir)
            output = train_level(
                trainer,
                final,
                masks,
                start,
                {"rewind": cfg.rewind, "rewind_step_k": k, "config_hash": cfg.hashname()},
                callbacks,
            )
        from .report import write_report

        if trainer.args.should_save:
            write_report(self.root)
        return output

    def _masks_after(self, level: int, current: MaskSet) -> MaskSet:
        """Prune the finished `level`'s final weights: masks for level + 1 (a subset of `current`)."""
        final = level_dir(self.root, level)
        model = self.trainer.model
        load_model(
            model, os.path.join(final, "model.safetensors"), strict=False, device=str(next(model.parameters()).device)
        )
        return self.method.next_level_masks(model, current, level + 1)

    def _start(self, level: int, k: int, init_file: str, rewind_dir: str) -> tuple[LevelStart, tuple]:
        cfg = self.config
        if level == 0:
            capture = (RewindCapture(k, rewind_dir),) if cfg.rewind in ("step", "lr") and k > 0 else ()
            return LevelStart(weights_file=init_file), capture
        previous = os.path.join(level_dir(self.root, level - 1), "model.safetensors")
        if cfg.rewind == "init" or (cfg.rewind == "step" and k == 0):
            return LevelStart(weights_file=init_file), ()
        if cfg.rewind == "step":
            return LevelStart(resume_from=rewind_dir), ()
        if cfg.rewind == "lr":
            return LevelStart(resume_from=rewind_dir if k > 0 else None, weights_file=previous), ()
        # "none": fine-tune the previous level's weights at its last learning rate.
        last_lr = _last_learning_rate(self.trainer, level - 1, self.root)
        overrides = {"lr_scheduler_type": "constant", "learning_rate": last_lr, "warmup_steps": 0}
        return LevelStart(weights_file=previous, args_overrides=overrides), ()


def _last_learning_rate(trainer: "TicketTrainer", level: int, root: str) -> float:
    import json

    with open(os.path.join(level_dir(root, level), "metrics.json"), encoding="utf-8") as fh:
        metrics = json.load(fh)
    return float(metrics.get("last_learning_rate", trainer.args.learning_rate))
