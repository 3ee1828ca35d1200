"""RigL and SET on the plug-in interface: constant per-layer counts, grown weights start at zero with zero
optimizer state, updates only at optimizer steps on the ΔT grid before T_end, growth by the dense gradient,
config validation, seeded identical masks, and resume equal to an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import StopAt, count_violations_of, make_cnn, make_dataset, training_args
from transformers import TrainerCallback

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer
from hf_tickets.methods.rigl import RigL, RigLConfig, SETConfig


def _trainer(out, method="rigl", max_steps=12, sparsity=0.7, **args):
    config = SparsityConfig(
        method=method, sparsity=sparsity, distribution="erk", update_interval=2, drop_fraction=0.5, stop_fraction=0.75
    )
    return TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=max_steps, **args),
        train_dataset=make_dataset("cnn", 64),
        sparsity_config=config,
    )


class Watch(TrainerCallback):
    """Per optimizer step: masks, per-layer counts, and what grown entries hold right after the update."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.masks: list[MaskSet] = [trainer.masks]
        self.grown_state_nonzero: list[int] = []
        self.grown_weight_nonzero: list[int] = []
        self.micro_changes = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_changes += self.trainer.masks is not self.masks[-1]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # runs after SparsityCallback's on_optimizer_step (registered later): the update has been applied
        new, old = self.trainer.masks, self.masks[-1]
        params = dict(self.trainer.model.named_parameters())
        inner = getattr(optimizer, "optimizer", optimizer)
        for name in new:
            grown = new[name] & ~old[name]
            self.grown_weight_nonzero.append(int((params[name].detach()[grown] != 0).sum()))
            for value in inner.state.get(params[name], {}).values():
                if isinstance(value, torch.Tensor) and value.shape == grown.shape:
                    self.grown_state_nonzero.append(int((value[grown] != 0).sum()))
        self.masks.append(new)


def _counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_updates_keep_counts_and_grow_from_zero(tmp_path, method):
    trainer = _trainer(tmp_path, method, gradient_accumulation_steps=2, weight_decay=0.1)
    watch = Watch(trainer)
    trainer.add_callback(watch)
    trainer.train()
    masks = watch.masks
    assert all(_counts(m) == _counts(masks[0]) for m in masks), "per-layer active counts never change"
    changed_at = [i for i in range(1, len(masks)) if masks[i] is not masks[i - 1]]
    assert changed_at == [2, 4, 6, 8], "updates at every ΔT=2 optimizer steps, before T_end = 0.75 * 12 = 9"
    assert any(not torch.equal(masks[0][n], masks[-1][n]) for n in masks[0]), "masks really moved"
    assert sum(watch.grown_weight_nonzero) == 0 and sum(watch.grown_state_nonzero) == 0
    assert watch.micro_changes == 0, "nothing changes at micro-steps"
    assert count_violations_of(trainer) == 0
    churn = [e["dst/churn"] for e in trainer.state.log_history if "dst/churn" in e]
    assert len(churn) == 4 and all(0 < c <= 0.5 for c in churn)
    ever = [e["dst/ever_active"] for e in trainer.state.log_history if "dst/ever_active" in e]
    assert ever == sorted(ever) and ever[-1] > 0.3


def test_rigl_grows_the_largest_dense_gradients():
    """One update by hand: dropped = smallest |w| among active, grown = largest |grad| among the rest."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False))
    cfg = SparsityConfig(method="rigl", sparsity=0.5, distribution="uniform", update_interval=1, drop_fraction=0.2)
    method = RigL(cfg)
    targets = dict(model.named_parameters())
    masks = method.initial_masks(model, targets, None)
    method.on_train_begin(model, masks, max_steps=1000)
    weight = model[0].weight
    weight.grad = torch.arange(100, dtype=torch.float32).view(10, 10)  # larger index = larger gradient
    method.on_dense_grads(model, masks, step=1)
    new = method.after_optimizer_step(model, masks, step=1)["0.weight"].reshape(-1)
    old = masks["0.weight"].reshape(-1)
    k = int(method.drop_fraction_at(1) * 50)
    abs_w = weight.detach().abs().reshape(-1)
    expected_drop = torch.zeros(100, dtype=torch.bool)
    expected_drop[torch.topk(abs_w.masked_fill(~old, float("inf")), k, largest=False).indices] = True
    inactive_after_drop = ~old | expected_drop
    expected_grow = torch.zeros(100, dtype=torch.bool)
    expected_grow[torch.topk(torch.where(inactive_after_drop, torch.arange(100.0), -1.0), k).indices] = True
    # dropped-then-regrown entries stay active: the net change is drop \ grow out, grow \ drop in
    assert torch.equal(new, (old & ~expected_drop) | expected_grow)
    assert int(new.sum()) == int(old.sum())


def test_masks_are_identical_for_the_same_seed(tmp_path):
    a, b = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    a.train()
    b.train()
    assert a.masks == b.masks


def test_config_fields_round_trip_and_bad_values_fail(tmp_path):
    cfg = SparsityConfig(
        method="rigl", sparsity=0.9, distribution="erk", update_interval=100, drop_fraction=0.3, stop_fraction=0.75
    )
    assert isinstance(cfg, RigLConfig)
    cfg.save_pretrained(tmp_path)
    assert SparsityConfig.from_pretrained(tmp_path) == cfg
    assert isinstance(SparsityConfig(method="set", sparsity=0.5), SETConfig)
    for bad in (
        {"update_interval": 0},
        {"drop_fraction": 0.0},
        {"drop_fraction": 1.0},
        {"stop_fraction": 0.0},
        {"stop_fraction": 1.5},
        {"distribution": "lognormal"},
        {"layer_rates": {"classifier": 0.5}},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SparsityConfig(method="rigl", sparsity=0.9, **bad)
    with pytest.raises(ValueError, match="sparsity"):
        SparsityConfig(method="rigl")


def test_resume_equals_uninterrupted(tmp_path):
    args = dict(save_strategy="steps", save_steps=3)
    full = _trainer(tmp_path / "full", **args)
    full.train()
    cut = _trainer(tmp_path / "cut", max_steps=12, **args)

    cut.add_callback(StopAt(5))
    cut.train()
    resumed = _trainer(tmp_path / "cut", **args)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path / "cut", "checkpoint-3"))
    assert resumed.masks == full.masks
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    keep = ("dst/", "sparsity", "loss")
    logs = [[{k: v for k, v in e.items() if k.startswith(keep)} for e in t.state.log_history] for t in (full, resumed)]
    assert logs[0][:-1] == logs[1][:-1]


def test_static_random_sparse_is_the_fixed_baseline(tmp_path):
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(tmp_path, max_steps=4),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=SparsityConfig(method="static", sparsity=0.8, distribution="erk"),
    )
    before = trainer.masks
    report = before.report()
    assert report["kept"] == round(0.2 * report["numel"])
    layer = before.layer_sparsity()
    assert len(set(round(v, 3) for v in layer.values())) > 1, "ERK gives layers different densities"
    trainer.train()
    assert trainer.masks is before and count_violations_of(trainer) == 0
    with pytest.raises(TypeError, match="update_interval belongs to method="):
        SparsityConfig(method="static", sparsity=0.8, update_interval=3)


def test_model_card_shows_mask_churn(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "Mask updates during training" in card and "mask_churn.png" in card
    assert (tmp_path / "final" / "mask_churn.png").stat().st_size > 1000
    assert card.count("\n| 2 |") == 1 and "\n| 8 |" in card, "one row per update"


def test_every_update_is_logged_whatever_logging_steps(tmp_path):
    trainer = _trainer(tmp_path, logging_steps=100)
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "dst/churn" in e]
    assert steps == [2, 4, 6, 8]
