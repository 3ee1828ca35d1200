"""RigL under gradient accumulation: 4 micro-batches of 32 choose the same masks as 1 batch of 128 on the same
samples. The model and data are float64, so the accumulated gradient equals the big-batch gradient up to rounding
far below any gap between the gradient magnitudes RigL ranks (issue 11, "Done when")."""

from __future__ import annotations

import torch
from conftest import training_args
from torch import nn
from transformers import TrainerCallback

from hf_tickets import SparsityConfig, TicketTrainer

N_SAMPLES = 256  # a multiple of 128: every optimizer step sees 128 samples in both runs
MAX_STEPS = 8
UPDATE_INTERVAL = 2


class MLP(nn.Module):
    """Three Linear layers, float64; mean-reduced MSE loss. `forward` has no **kwargs, so Trainer divides each
    micro-batch's loss by the accumulation steps (it passes no `num_items_in_batch`). Records the sample ids seen."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        self.double()
        self.seen: list[list[int]] = []

    def forward(self, input_x, sample_id, labels=None):
        self.seen.append(sample_id.tolist())
        y = self.body(input_x)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=N_SAMPLES):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 16, generator=g, dtype=torch.float64)
        w = torch.randn(16, 4, generator=g, dtype=torch.float64)
        self.y = torch.sin(self.x @ w) + 0.1 * torch.randn(n, 4, generator=g, dtype=torch.float64)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "sample_id": torch.tensor(i), "labels": self.y[i]}


class MaskLog(TrainerCallback):
    """The masks after every optimizer step (runs after SparsityCallback's update: registered later)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.masks = [trainer.masks]

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks.append(self.trainer.masks)


def _train(out, batch_size, accumulation):
    model = MLP()
    config = SparsityConfig(
        method="rigl",
        sparsity=0.7,
        distribution="erk",
        update_interval=UPDATE_INTERVAL,
        drop_fraction=0.5,
        stop_fraction=1.0,
    )
    trainer = TicketTrainer(
        model=model,
        args=training_args(
            out,
            max_steps=MAX_STEPS,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
        ),
        train_dataset=Data(),
        sparsity_config=config,
    )
    log = MaskLog(trainer)
    trainer.add_callback(log)
    trainer.train()
    per_step = [sum(model.seen[i : i + accumulation], []) for i in range(0, len(model.seen), accumulation)]
    return trainer, log.masks, per_step


def test_accumulation_4x32_gives_the_masks_of_1x128(tmp_path):
    big, big_masks, big_seen = _train(tmp_path / "1x128", 128, 1)
    acc, acc_masks, acc_seen = _train(tmp_path / "4x32", 32, 4)
    # Same samples, in the same order, at every optimizer step; each step sees 128 distinct samples.
    assert len(big_seen) == len(acc_seen) == MAX_STEPS
    assert big_seen == acc_seen
    assert all(len(set(s)) == 128 for s in big_seen)
    # The logged losses agree (Trainer accumulates the logged loss in float32, hence the tolerance): the accumulated
    # loss, and so the gradient, is the big batch's mean, not 4 times it.
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (big, acc)]
    assert len(losses[0]) == MAX_STEPS
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-6, atol=0)
    # Masks bitwise equal after every step, updates included.
    assert len(big_masks) == len(acc_masks) == MAX_STEPS + 1
    for step, (a, b) in enumerate(zip(big_masks, acc_masks)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name}"
    # ... and RigL really changed them at every update step (2, 4, 6; stop_fraction=1.0 stops before step 8).
    changed = [
        s
        for s in range(1, MAX_STEPS + 1)
        if any(not torch.equal(big_masks[s][n], big_masks[s - 1][n]) for n in big_masks[s])
    ]
    assert changed == [2, 4, 6]
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        assert p.dtype == torch.float64
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), name
