"""Train the toy method for a fixed number of steps, checkpointing every step; resume from the last checkpoint
when one exists. Run as a process so that tests can kill it at any moment (tests/test_resume_kill.py)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_method  # noqa: E402,F401  (registers "toy_grow_prune")
from conftest import make_cnn, make_dataset, training_args  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402


def main(out: str, steps: int) -> None:
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=steps, save_strategy="steps", save_steps=1, save_total_limit=2),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=SparsityConfig(method="toy_grow_prune", every=2, seed=3),
    )
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(os.path.join(out, "final"))
    with open(os.path.join(out, "final", "log_history.json"), "w") as fh:
        json.dump(trainer.state.log_history, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
