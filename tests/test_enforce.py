"""The one enforcement path: zeros are written (NaN/inf in pruned entries cannot survive), optimizer state of
pruned entries is zeroed when masks change, and the per-step pass it skips (optimizer state) is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bert, make_dataset, training_args
from torch import nn
from transformers import TrainerCallback

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity
from hf_tickets.enforce import MaskEnforcer, zero_pruned_flat_


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_nan_and_inf_in_pruned_entries_become_zero():
    model = _mlp()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    enforcer = MaskEnforcer(masks, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    enforcer.mask_grads_()
    enforcer.mask_weights_()
    for name, mask in masks.items():
        param = dict(model.named_parameters())[name]
        assert torch.all(param.grad[~mask] == 0) and torch.all(param[~mask] == 0), name
        assert torch.isnan(param.grad[mask]).all(), "kept gradients are left alone"
    assert torch.isnan(model[0].bias.grad).all(), "parameters without a mask are left alone"


def test_missing_gradients_are_skipped():
    model = _mlp()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    model[2].weight.grad = torch.ones_like(model[2].weight)  # model[0].weight has no gradient
    MaskEnforcer(masks, model).mask_grads_()
    assert model[0].weight.grad is None
    assert torch.equal(model[2].weight.grad, masks["2.weight"].float())


def test_zero_optimizer_state_zeroes_only_pruned_entries():
    model = _mlp()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[model[0].weight].items() if v.dim() > 0}
    MaskEnforcer(masks, model).zero_optimizer_state_(optimizer)
    mask = masks["0.weight"]
    for key, value in optimizer.state[model[0].weight].items():
        if value.dim() > 0:
            assert torch.all(value[~mask] == 0) and torch.equal(value[mask], before[key][mask]), key


def test_zero_pruned_flat_is_the_batched_form():
    flat = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    zero_pruned_flat_([flat], torch.tensor([False, True, False, True]))
    assert flat.tolist() == [1.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_skipped_per_step_state_zeroing_is_exact(tmp_path, optim):
    """Optimizer state is zeroed only when masks change: between changes, pruned gradients are zero, so Adam's
    moments and SGD's momentum of pruned entries stay exactly zero by themselves. Proven here over 12 steps with
    weight decay, accumulation and clipping."""
    model = make_bert()
    trainer = TicketTrainer(
        model=model,
        args=training_args(
            tmp_path,
            max_steps=12,
            optim=optim,
            optim_args="momentum=0.9" if optim == "sgd" else None,
            weight_decay=0.1,
            gradient_accumulation_steps=2,
            max_grad_norm=0.5,
        ),
        train_dataset=make_dataset("bert", 64),
        sparsity_config=SparsityConfig(sparsity=0.7),
    )
    seen = []

    class CheckState(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            params = dict(model.named_parameters())
            inner = getattr(optimizer, "optimizer", optimizer)
            for name, mask in trainer.masks.items():
                for value in inner.state[params[name]].values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        seen.append(int((value[~mask] != 0).sum()))

    trainer.add_callback(CheckState())
    trainer.train()
    assert seen and sum(seen) == 0


def test_changed_masks_zero_the_optimizer_state_of_newly_pruned_entries(tmp_path):
    model = make_bert()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6),
        train_dataset=make_dataset("bert", 32),
        sparsity_config=SparsityConfig(sparsity=0.3),
    )
    stricter: dict[str, MaskSet] = {}

    class Tighten(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                stricter["masks"] = apply_sparsity(model, SparsityConfig(sparsity=0.8))
                trainer.set_masks(stricter["masks"])
                params = dict(model.named_parameters())
                inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
                for name, mask in stricter["masks"].items():
                    for value in inner.state[params[name]].values():
                        if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                            assert torch.all(value[~mask] == 0), name

    trainer.add_callback(Tighten())
    trainer.train()
    assert trainer.masks.sparsity() == pytest.approx(0.8, abs=1e-3)
