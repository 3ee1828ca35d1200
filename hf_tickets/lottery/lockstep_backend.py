"""The lockstep backend: trains all arms of a level together, in one pass of `train_lockstep`.

At level L every arm of the experiment has what it needs before the level starts (the trunk's masks from level
L-1, a control's masks from them), so the trunk, its controls and the replicates of a level train together
(`BatchedMaskedTraining`, on CUDA replayed from a CUDA graph) instead of one `Trainer.train` after another. Arms
that resume from the rewind point join the pass at step k.

What it supports: image networks, BatchNorm included (each arm keeps its own running statistics, saved in its
level folder and rewind point as the Trainer backend saves them; momentum=None is refused); `TensorImageDataset`
data; AdamW/Adam or SGD (momentum, Nesterov) as `TrainingArguments.optim`; every transformers LR schedule; gradient
clipping; weight decay with the Trainer's exemptions; rewind to theta_0 or to step k. Batches are always full (a
batch may straddle two epochs) and their order comes from `seed` + replicate, so a level's numbers are those of the
same experiment under `Trainer`, not the same bits. It runs no Trainer callbacks and computes loss and accuracy
itself, so it refuses user callbacks and other `compute_metrics`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..cards import write_model_card
from ..checkpoints import load_saved_weights
from ..files import TRAINING_ARGS_NAME, WEIGHTS_NAME
from .arms import Arm, masked_copy_digest
from .layout import PARTIAL_SUFFIX, publish_level, write_json_atomic
from .lockstep import (
    ArmStart,
    SplitTensors,
    TrainPlan,
    batch_tables,
    load_weights_,
    plan_from_training_args,
    train_lockstep,
)
from .metrics import level_metrics
from .rewind import load_rewind_point, save_rewind_point

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer

logger = logging.getLogger(__name__)


class LockstepBackend:
    """Trains arms in lockstep passes on the trainer's device, from the trainer's model, data and arguments."""

    name = "lockstep"

    def __init__(self, trainer: "LotteryTrainer", replicates: int = 1) -> None:
        check_trainer(trainer)
        self.trainer = trainer
        self.args = trainer.args
        self.config = trainer.sparsity_config
        self.device = torch.device(trainer.args.device)
        self.template = cpu_copy(trainer.model)
        self.train_split = _tensors(trainer.train_dataset, "train_dataset", self.device)
        self.eval_splits = _eval_splits(trainer.eval_dataset, self.device)
        self.decay_names = set(trainer.get_decay_parameter_names(trainer.model))
        self.plan: TrainPlan = plan_from_training_args(
            trainer.args, trainer.model, len(self.train_split.y), self.decay_names
        )
        self.replicates = replicates
        self._tables: Optional[torch.Tensor] = None
        self._points: dict = {}  # rewind points and start files read so far (immutable once written)
        self._files: dict = {}
        self.last_pass: dict = {}

    def total_steps(self) -> int:
        return self.plan.total_steps

    def train(self, arms: list[Arm]) -> list[dict]:
        if not arms:
            return []
        starts = [self._arm_start(arm) for arm in arms]
        capture = {arm.capture_step for arm in arms if arm.capture_rewind_point is not None}
        if len(capture) > 1:
            raise ValueError(f"arms of one pass capture rewind points at different steps {sorted(capture)}.")
        if self._tables is None:  # every level replays the same data orders: draw them once
            self._tables = batch_tables(self.plan, len(self.train_split.y), self.replicates, self.device)
        started = time.perf_counter()
        results = train_lockstep(
            self.template,
            starts,
            self.plan,
            self.train_split,
            self.eval_splits,
            self._tables,
            snapshot_step=capture.pop() if capture else None,
        )
        seconds = time.perf_counter() - started
        steps = sum(self.plan.total_steps - start.start_step for start in starts)
        self.last_pass = {"networks": len(arms), "network_steps": steps, "seconds": seconds}
        logger.info("lockstep pass: %d networks, %d network-steps in %.1f s", len(arms), steps, seconds)
        out = []
        for arm, result in zip(arms, results):
            if arm.capture_rewind_point is not None and result.snapshot is not None:
                # written before level 0 is published: a finished level 0 always has its rewind point
                save_rewind_point(
                    arm.capture_rewind_point,
                    self.template,
                    result.snapshot,
                    arm.capture_step,
                    self.args,
                    self.decay_names,
                    self.plan.total_steps,
                )
            metrics = level_metrics(arm.masks, result.history, result.train_loss, self.plan.total_steps)
            metrics["last_learning_rate"] = self.plan.lrs[-1]
            metrics.update(arm.extra_metrics, backend=self.name)
            self._write(arm, result.weights, metrics)
            out.append(metrics)
        return out

    def _arm_start(self, arm: Arm) -> ArmStart:
        if arm.args_overrides:
            raise ValueError(
                f"{arm.name}: the lockstep backend cannot change training arguments per arm "
                f"({sorted(arm.args_overrides)}): use backend='trainer'."
            )
        weights, state, step = {}, None, 0
        if arm.rewind_point is not None:
            if arm.rewind_point not in self._points:  # written once at level 0, read by every later arm
                self._points[arm.rewind_point] = load_rewind_point(arm.rewind_point, self.template, self.decay_names)
            point = self._points[arm.rewind_point]
            weights, state, step = dict(point.weights), dict(point.optimizer_state), point.step
        if arm.weights_file is not None:
            if arm.weights_file not in self._files:
                self._files[arm.weights_file] = load_saved_weights(arm.weights_file, self.template)
            weights.update(self._files[arm.weights_file])
        masks = dict(arm.masks)
        expected = arm.extra_metrics.get("identity", {}).get("start_weights_sha256")
        if expected is not None and masked_copy_digest(self.template, weights, masks) != expected:
            raise RuntimeError(
                f"{arm.name} does not start from the weights the lottery runner planned: its rewind point or "
                "initial weights changed on disk since the run began."
            )
        return ArmStart(weights, masks, step, state, arm.replicate)

    def _write(self, arm: Arm, weights: dict, metrics: dict) -> None:
        partial = arm.folder + PARTIAL_SUFFIX
        os.makedirs(partial, exist_ok=True)
        model = cpu_copy(self.template)
        load_weights_(model, weights)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(partial)
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(partial, WEIGHTS_NAME))
        arm.masks.save(partial)
        self.config.save_pretrained(partial)
        evals = {f"eval_validation_{k}": v for k, v in (metrics.get("final_eval") or {}).items()}
        write_model_card(partial, masks=arm.masks, config=self.config, model=model, metrics=evals, chart=False)
        write_json_atomic(os.path.join(partial, TRAINING_ARGS_NAME), json.loads(self.args.to_json_string()))
        publish_level(partial, arm.folder, metrics)


def cpu_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).cpu()
    for attr in ("hf_tickets_masks",):
        if attr in clone.__dict__:
            del clone.__dict__[attr]
    return clone


def _tensors(dataset, what: str, device) -> SplitTensors:
    pixels, labels = getattr(dataset, "pixel_values", None), getattr(dataset, "labels", None)
    if not isinstance(pixels, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"the lockstep backend needs {what} as a hf_tickets.data.TensorImageDataset (image tensors), got "
            f"{type(dataset).__name__}: use backend='trainer' for other data."
        )
    return SplitTensors(pixels.to(device), labels.to(device))


def _eval_splits(eval_dataset, device) -> dict[str, SplitTensors]:
    if eval_dataset is None:
        raise ValueError("the lockstep backend needs eval_dataset (a validation split) to find the early-stop step.")
    if not isinstance(eval_dataset, dict):
        return {"validation": _tensors(eval_dataset, "eval_dataset", device)}
    if "validation" not in eval_dataset:
        raise ValueError(f"eval_dataset needs a 'validation' entry (and optionally 'test'), got {list(eval_dataset)}.")
    return {
        name: _tensors(ds, f"eval_dataset[{name!r}]", device)
        for name, ds in eval_dataset.items()
        if name in ("validation", "test")
    }


def check_trainer(trainer) -> None:
    """Refuse what the lockstep backend would silently drop: user callbacks, other metrics, a user optimizer."""
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    from ..callbacks import SparsityCallback
    from .metrics import accuracy

    builtin = (DefaultFlowCallback, PrinterCallback, ProgressCallback, SparsityCallback)
    extra = [type(cb).__name__ for cb in trainer.callback_handler.callbacks if not isinstance(cb, builtin)]
    if extra:
        raise ValueError(
            f"backend='lockstep' does not run Trainer callbacks, but the trainer has {extra} (report_to integrations "
            "count too: set report_to=[]): remove them or use backend='trainer'."
        )
    if trainer.compute_metrics not in (None, accuracy):
        raise ValueError(
            "backend='lockstep' computes loss and accuracy itself and cannot call a custom compute_metrics: pass "
            "compute_metrics=None (or hf_tickets.lottery.metrics.accuracy) or use backend='trainer'."
        )
    if getattr(trainer, "_user_optimizer", False):
        raise ValueError(
            "backend='lockstep' builds its own optimizer from TrainingArguments.optim: pass no optimizers=."
        )
