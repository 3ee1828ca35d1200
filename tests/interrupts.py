"""Callbacks that stop a lottery level mid-way, as a killed process stops, and record where each run resumed
(shared by the LoRA resume test and the FSDP2 resume worker)."""

from __future__ import annotations

import os

from transformers import TrainerCallback


class Interrupted(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raises at global step `step` of the level trained in `folder` (a level trains in `<folder>.partial`, Trainer's
    output_dir), after Trainer saved that step's checkpoint if any; under several ranks every rank raises."""

    def __init__(self, folder: str, step: int) -> None:
        self.folder, self.step = folder, step

    def on_step_end(self, args, state, control, **kwargs):
        if os.path.basename(args.output_dir).startswith(self.folder) and state.global_step == self.step:
            raise Interrupted(f"{self.folder} at step {state.global_step}")


class TrainBegins(TrainerCallback):
    """The global step every `Trainer.train` run begins at (a resumed level: its checkpoint's step)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
