"""The rewind point: step k of level 0, in one format that both backends write and read.

The format is a Trainer checkpoint folder (`model.safetensors`, `optimizer.pt`, `scheduler.pt`,
`trainer_state.json`), because the Trainer backend resumes from it with `resume_from_checkpoint` and needs every
piece. The Trainer backend copies its own `checkpoint-k` there (`RewindCapture`). The lockstep backend writes the
same files from its stacked buffers through a real `torch.optim` optimizer and LR scheduler built by Trainer's own
helpers (`Trainer.get_optimizer_cls_and_kwargs`, `get_scheduler`, the decay/no-decay groups of
`Trainer.create_optimizer`), and reads a Trainer-written point back by the same parameter order. So a trunk trained
by one backend can be continued, or its controls run, by the other. A peft model's point (Trainer backend only) holds
its adapter files instead of `model.safetensors`: the frozen base is theta_0's.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME  # the checkpoint's own names
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints import load_saved_weights
from ..distributed import world_size
from ..files import WEIGHTS_NAME
from .lockstep import trainer_scheduler

# Per-parameter optimizer buffers the lockstep backend keeps (BatchedMaskedTraining.arm_state keys "<buffer>/<name>").
BUFFERS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


@dataclass
class RewindPoint:
    """Weights, optimizer buffers (`<buffer>/<parameter>` keys) and the optimizer step they belong to."""

    weights: dict
    optimizer_state: dict
    step: int


def optimizer_param_names(model: nn.Module, decay_names: set) -> list[str]:
    """Trainable parameter names in the order of `Trainer.create_optimizer`'s groups: decayed, then the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named if n in decay_names] + [n for n, _ in named if n not in decay_names]


def save_rewind_point(
    folder: str, model: nn.Module, state: dict, step: int, args, decay_names: set, total_steps: int
) -> None:
    """Write a lockstep arm's state at `step` as a Trainer checkpoint (atomically: a `.tmp` folder renamed).

    Args:
        model: a CPU module of the architecture (copied; its weights are replaced by `state`'s `weights/...`).
        state: `BatchedMaskedTraining.arm_state` keys.
        args: the run's `TrainingArguments` (optimizer, schedule, batch size).
    """
    model = copy.deepcopy(model).cpu()
    weights = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith("weights/")}
    model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters())
    names = optimizer_param_names(model, decay_names)
    decayed = [n for n in names if n in decay_names]
    groups = [
        {"params": [params[n] for n in decayed], "weight_decay": args.weight_decay},
        {"params": [params[n] for n in names if n not in decay_names], "weight_decay": 0.0},
    ]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(groups, **optimizer_kwargs)
    scheduler = trainer_scheduler(args, optimizer, total_steps)
    for _ in range(step):  # no gradients: optimizer.step() changes nothing, the schedule advances to step k
        optimizer.step()
        scheduler.step()
    for name in names:
        buffers = {b: state[f"{b}/{name}"].detach().cpu().clone() for b in BUFFERS if f"{b}/{name}" in state}
        if "exp_avg" in buffers:  # torch.optim.Adam/AdamW keep their step count per parameter
            buffers["step"] = torch.tensor(float(step))
        if buffers:
            optimizer.state[params[name]] = buffers
    trainer_state = TrainerState(
        global_step=step,
        max_steps=total_steps,
        train_batch_size=args.per_device_train_batch_size,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps or args.logging_steps,
        save_steps=args.save_steps,
    )
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    else:
        save_model(model, os.path.join(tmp, WEIGHTS_NAME))
    torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_NAME))
    torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_NAME))
    trainer_state.save_to_json(os.path.join(tmp, TRAINER_STATE_NAME))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_rewind_point(folder: str, model: nn.Module, decay_names: set) -> RewindPoint:
    """Read a rewind point written by either backend into lockstep terms."""
    missing = [
        n for n in (WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME) if not os.path.isfile(os.path.join(folder, n))
    ]
    if missing:
        raise ValueError(
            f"the rewind point {folder} lacks {missing}: level 0 of this run must be trained (again) to make it."
        )
    step = TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE_NAME)).global_step
    saved = torch.load(os.path.join(folder, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
    names = optimizer_param_names(model, decay_names)
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(names):
        raise ValueError(
            f"the rewind point {folder} holds optimizer state for {len(ids)} parameters, the model trains "
            f"{len(names)}: it was written for another model or other decay groups."
        )
    state = {}
    for index, name in zip(ids, names):
        for buffer, value in saved["state"].get(index, {}).items():
            if buffer in BUFFERS:
                state[f"{buffer}/{name}"] = value
    return RewindPoint(weights=load_saved_weights(folder, model), optimizer_state=state, step=int(step))


class RewindCapture(TrainerCallback):
    """Trainer backend: copies the Trainer checkpoint taken at step k of level 0 to the rewind point folder."""

    def __init__(self, step: int, destination: str) -> None:
        self.step = step
        self.destination = destination

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not os.path.isdir(self.destination):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != self.step or os.path.isdir(self.destination):
            return
        # Every rank writes its own rng_state_<rank>.pth into checkpoint-k: copy once all of them have (without the
        # barrier, rank 0 could copy before rank 1 wrote its file, and rank 1 would rewind without its RNG state).
        if world_size() > 1:
            dist.barrier()
        if args.should_save:
            copy_checkpoint(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.step}"), self.destination)


def copy_checkpoint(source: str, destination: str) -> None:
    """Copy a checkpoint folder so that `destination` is either absent or complete (a `.tmp` copy renamed)."""
    tmp = destination + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, destination)


def rewind_point_step(folder: str) -> Optional[int]:
    """The step a rewind point holds, or None when there is none."""
    path = os.path.join(folder, TRAINER_STATE_NAME)
    return TrainerState.load_from_json(path).global_step if os.path.isfile(path) else None
