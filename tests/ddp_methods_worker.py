"""Every method under torchrun (CPU, gloo): each rank trains a few optimizer steps of one method and records, after
every step, the digest of its masks and the number of pruned weights that are not exactly zero; the ranks then
all_gather their digests, so each rank's JSON holds every rank's (tests/test_distributed_methods.py compares them).

Each rank builds its model from a *different* seed (rank + 1): DDP broadcasts rank 0's weights when the model is
prepared, and the initial masks, computed before that, must be rank 0's too (`hf_tickets.distributed`), or DDP
would average the gradients of different sparse networks. A last check makes one rank set other masks than the
others: that must raise on every rank instead of training on.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_methods_worker.py OUT [STEPS]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import make_bert, make_dataset, training_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer  # noqa: E402
from hf_tickets.distributed import gather_digests, masks_digest  # noqa: E402
from hf_tickets.enforce import count_violations  # noqa: E402

# name -> SparsityConfig kwargs: one-shot (magnitude, random, N:M), data-driven at init (SNIP: every rank scores
# its own batches), mask-changing during training (RigL, SET, gradual magnitude).
METHODS = {
    "magnitude": dict(method="magnitude", sparsity=0.6),
    "random": dict(method="random", sparsity=0.6, seed=3),
    "nm": dict(method="nm", pattern="2:4"),
    "snip": dict(method="snip", sparsity=0.6),
    "rigl": dict(method="rigl", sparsity=0.6, update_interval=2, drop_fraction=0.3, stop_fraction=0.75),
    "set": dict(method="set", sparsity=0.6, update_interval=2, drop_fraction=0.3, stop_fraction=0.75, seed=5),
    "gradual": dict(method="gradual", sparsity=0.6, end_step=6, update_interval=2),
}


class Record(TrainerCallback):
    """Digest and leaks after every optimizer step (on_step_end: after SparsityCallback's re-masking)."""

    def __init__(self, trainer: TicketTrainer) -> None:
        self.trainer = trainer
        self.steps = [self._now(0)]

    def _now(self, step: int) -> dict:
        masks = self.trainer.masks
        return {"step": step, "masks": masks_digest(masks), "leaks": count_violations(self.trainer.model, masks)}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(self._now(state.global_step))


def run_method(name: str, out: str, steps: int) -> dict:
    rank = int(os.environ["RANK"])  # torchrun's; the process group starts with the TrainingArguments below
    trainer = TicketTrainer(
        model=make_bert(seed=rank + 1),  # different weights on every rank: the masks must still be rank 0's
        args=training_args(
            os.path.join(out, name), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2
        ),
        train_dataset=make_dataset("bert", 64),
        sparsity_config=SparsityConfig(**METHODS[name]),
    )
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train()
    trainer.save_model()  # only the main process writes (Trainer's should_save): the test counts the writers
    return {
        "steps": record.steps,
        "final_digests": gather_digests(trainer.masks),
        "weights": _weights_digest(trainer.model),
        "sparsity": trainer.masks.sparsity(),
    }


def _weights_digest(model: torch.nn.Module) -> list[str]:
    """Every rank's digest of its weights (DDP keeps them equal)."""
    import hashlib

    digest = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        digest.update(p.detach().contiguous().numpy().tobytes())
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest.hexdigest())
    return out


def diverging_update_refused(out: str) -> str:
    """One rank sets other masks than the others: every rank must get the RuntimeError (nothing trains on)."""
    rank = int(os.environ["RANK"])
    trainer = TicketTrainer(
        model=make_bert(seed=0),
        args=training_args(os.path.join(out, "diverge"), max_steps=1),
        train_dataset=make_dataset("bert", 16),
        sparsity_config=SparsityConfig(method="magnitude", sparsity=0.5),
    )
    masks = trainer.masks
    changed = dict(masks)
    if rank == 1:
        first = next(iter(changed))
        changed[first] = ~changed[first]
    try:
        trainer.set_masks(MaskSet(changed, masks.metadata))
    except RuntimeError as err:
        return str(err)
    return ""


def main(out: str, steps: int) -> None:
    os.makedirs(out, exist_ok=True)
    results = {}
    for name in METHODS:
        results[name] = run_method(name, out, steps)
    result = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "methods": results,
        "diverge_error": diverging_update_refused(out),
    }
    with open(os.path.join(out, f"rank_{result['rank']}.json"), "w") as fh:
        json.dump(result, fh)
    # Leave together and close gloo: once in six runs a rank aborted at exit ("terminate called without an active
    # exception") with the process group still open.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
