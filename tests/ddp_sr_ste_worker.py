"""SR-STE under torchrun (CPU, gloo): every rank records, after every optimizer step, fingerprints of the model's
weights (the N:M projection), of SR-STE's dense weights and of its masks, and whether every group holds 2:4
(tests/test_distributed.py compares the ranks).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_sr_ste_worker.py OUT [STEPS]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_bert, make_dataset, training_args  # noqa: E402
from ddp_rigl_worker import fingerprint  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402
from hf_tickets.nm import check_tensors, nm_dims  # noqa: E402


class Record(TrainerCallback):
    """After every step (on_step_end: after SparsityCallback's on_optimizer_step has written the projection)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        method = self.trainer.sparsity_method
        params = dict(model.named_parameters())
        names = list(method._masks)
        self.steps.append(
            {
                "step": state.global_step,
                "weights": fingerprint({n: params[n] for n in names}),
                "dense": fingerprint(method._dense),
                "masks": fingerprint(method._masks),
                "holds": check_tensors(params, nm_dims(model, names), "2:4").ok,
            }
        )


def main(out: str, steps: int) -> None:
    trainer = TicketTrainer(
        model=make_bert(),
        args=training_args(out, max_steps=steps, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd"),
        train_dataset=make_dataset("bert", 64),
        sparsity_config=SparsityConfig(method="sr_ste"),
    )
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "world_size": trainer.args.world_size, "steps": record.steps}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
