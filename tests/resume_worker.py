"""Train a sparsity method for a fixed number of steps, checkpointing every step; resume from the last complete
checkpoint when one exists. Run as a process so that tests can kill it at any moment (tests/test_resume_kill.py).

    python tests/resume_worker.py OUT STEPS [METHOD]    # METHOD: toy (default), rigl or set
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_method  # noqa: E402,F401  (registers "toy_grow_prune")
from conftest import make_cnn, make_dataset, training_args  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402


def _dst(method: str) -> SparsityConfig:
    return SparsityConfig(
        method=method,
        sparsity=0.7,
        distribution="erk",
        update_interval=2,
        drop_fraction=0.5,
        stop_fraction=0.75,
        seed=3,
    )


CONFIGS = {
    "toy": lambda: SparsityConfig(method="toy_grow_prune", every=2, seed=3),
    "rigl": lambda: _dst("rigl"),
    "set": lambda: _dst("set"),
}


def main(out: str, steps: int, method: str = "toy") -> None:
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=steps, save_strategy="steps", save_steps=1, save_total_limit=2),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=CONFIGS[method](),
    )
    # as a user restarts: resume_from_checkpoint=True, which skips a checkpoint torn by the kill
    started = os.path.isdir(out) and any(n.startswith(PREFIX_CHECKPOINT_DIR) for n in os.listdir(out))
    trainer.train(resume_from_checkpoint=True if started else None)
    trainer.save_model(os.path.join(out, "final"))
    with open(os.path.join(out, "final", "log_history.json"), "w") as fh:
        json.dump(trainer.state.log_history, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
