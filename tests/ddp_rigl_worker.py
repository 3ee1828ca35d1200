"""RigL under torchrun (CPU, gloo): every rank records a fingerprint of its masks after every optimizer step, the
samples it read, and saves its final masks to `<out>/rank_<R>` (tests/test_distributed.py compares the ranks).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_rigl_worker.py OUT [STEPS]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import DictDataset, make_cnn, make_dataset, training_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for name in tensors:
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordingDataset(DictDataset):
    """Remembers which rows this process read (dataloader_num_workers=0: in this process)."""

    def __init__(self, rows):
        super().__init__(rows)
        self.read: list[int] = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


class MaskFingerprints(TrainerCallback):
    """Masks after every optimizer step; registered after SparsityCallback, so an update has been applied."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps = [{"step": 0, "masks": fingerprint(trainer.masks), "active": _active(trainer.masks)}]

    def on_optimizer_step(self, args, state, control, **kwargs):
        masks = self.trainer.masks
        self.steps.append({"step": state.global_step + 1, "masks": fingerprint(masks), "active": _active(masks)})


def _active(masks) -> dict[str, int]:
    return {n: int(masks[n].sum()) for n in masks}


def main(out: str, steps: int) -> None:
    data = RecordingDataset(make_dataset("cnn", 64).rows)
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        train_dataset=data,
        sparsity_config=SparsityConfig(
            method="rigl",
            sparsity=0.7,
            distribution="erk",
            update_interval=2,
            drop_fraction=0.5,
            stop_fraction=0.75,
        ),
    )
    record = MaskFingerprints(trainer)
    trainer.add_callback(record)
    trainer.train()
    rank = trainer.args.process_index
    trainer.masks.save(os.path.join(out, f"rank_{rank}"))
    result = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "steps": record.steps,
        "weights": fingerprint(dict(trainer.model.named_parameters())),
        "samples_read": data.read,
        "churn": [e["dst/churn"] for e in trainer.state.log_history if "dst/churn" in e],
    }
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)
