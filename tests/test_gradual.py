"""Gradual magnitude pruning (Zhu & Gupta 2017): the config's checks, the cubic schedule inside TicketTrainer
(target reached at end_step exactly, masks only shrink, nothing changes between updates), and the config round
trip."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import StopAt, count_violations_of, make_cnn, make_dataset, training_args
from transformers import TrainerCallback

import hf_tickets.methods.gradual  # noqa: F401  (registers "gradual" until methods/__init__ imports it)
from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity
from hf_tickets.methods import build_method
from hf_tickets.methods.gradual import GradualConfig


def test_config_builds_and_validates():
    cfg = SparsityConfig(method="gradual", sparsity=0.9, end_step=100)
    assert isinstance(cfg, GradualConfig)
    assert (cfg.initial_sparsity, cfg.start_step, cfg.update_interval) == (0.0, 0, 100)
    with pytest.raises(ValueError, match="SparsityConfig.sparsity is required"):
        SparsityConfig(method="gradual", end_step=100)
    with pytest.raises(ValueError, match="SparsityConfig.end_step"):
        SparsityConfig(method="gradual", sparsity=0.9)
    with pytest.raises(ValueError, match="SparsityConfig.end_step=10 .*start_step=10"):
        SparsityConfig(method="gradual", sparsity=0.9, start_step=10, end_step=10)
    with pytest.raises(ValueError, match="SparsityConfig.end_step"):
        SparsityConfig(method="gradual", sparsity=0.9, end_step=50.5)
    with pytest.raises(ValueError, match="SparsityConfig.start_step"):
        SparsityConfig(method="gradual", sparsity=0.9, start_step=-1, end_step=10)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="SparsityConfig.update_interval"):
            SparsityConfig(method="gradual", sparsity=0.9, end_step=100, update_interval=bad)
    for bad in (-0.1, 0.95, "0.1"):
        with pytest.raises(ValueError, match="SparsityConfig.initial_sparsity"):
            SparsityConfig(method="gradual", sparsity=0.9, end_step=100, initial_sparsity=bad)
    with pytest.raises(ValueError, match="SparsityConfig.pattern='2:4'"):
        SparsityConfig(method="gradual", sparsity=0.5, pattern="2:4", end_step=100)
    with pytest.raises(TypeError, match="end_step belongs to method='gradual'"):
        SparsityConfig(method="magnitude", sparsity=0.5, end_step=100)


def test_cubic_schedule():
    cfg = SparsityConfig(method="gradual", sparsity=0.8, initial_sparsity=0.2, start_step=10, end_step=50)
    assert cfg.sparsity_at(0) == cfg.sparsity_at(10) == 0.2
    assert cfg.sparsity_at(30) == pytest.approx(0.8 - 0.6 * 0.5**3)
    assert cfg.sparsity_at(50) == cfg.sparsity_at(1000) == 0.8
    values = [cfg.sparsity_at(t) for t in range(0, 60)]
    assert values == sorted(values)
    cfg = SparsityConfig(method="gradual", sparsity=0.8, start_step=2, end_step=10, update_interval=3)
    assert [t for t in range(1, 20) if cfg.is_update_step(t)] == [5, 8, 10]  # end_step always an update


class _MaskRecorder(TrainerCallback):
    """Masks after every optimizer step (registered after the sparsity callback, so it sees the new masks)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.masks: dict[int, MaskSet] = {}
        self.violations: list[int] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks[state.global_step + 1] = self.trainer.masks.clone()
        self.violations.append(count_violations_of(self.trainer))


def _trainer(out, config, max_steps=12, **args):
    return TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=max_steps, **args),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=config,
    )


def _pruned(masks: MaskSet) -> int:
    return masks.numel() - masks.kept()


def test_schedule_inside_ticket_trainer(tmp_path):
    cfg = SparsityConfig(
        method="gradual", sparsity=0.8, initial_sparsity=0.1, start_step=2, end_step=10, update_interval=3
    )
    trainer = _trainer(tmp_path, cfg, max_steps=12)
    start = trainer.masks.clone()
    total = start.numel()
    assert _pruned(start) == round(0.1 * total)
    recorder = _MaskRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    previous = start
    for step in range(1, 13):
        masks = recorder.masks[step]
        assert masks.is_subset_of(previous), f"masks grew at step {step}"
        if cfg.is_update_step(step):
            assert _pruned(masks) == round(cfg.sparsity_at(step) * total), step
            assert _pruned(masks) > _pruned(previous), f"no pruning at update step {step}"
        else:
            assert masks == previous, f"masks changed between updates, at step {step}"
        previous = masks
    assert _pruned(recorder.masks[10]) == round(0.8 * total), "the target is reached at end_step exactly"
    assert recorder.masks[12] == recorder.masks[10]
    sparsities = [recorder.masks[t].sparsity() for t in range(1, 13)]
    assert sparsities == sorted(sparsities)
    assert recorder.violations == [0] * 12
    assert count_violations_of(trainer) == 0

    trainer.save_model(str(tmp_path / "final"))
    assert MaskSet.load(str(tmp_path / "final")) == trainer.masks
    assert SparsityConfig.from_pretrained(str(tmp_path / "final")) == cfg


def test_update_prunes_the_smallest_alive_weights_layerwise():
    model = make_cnn()
    cfg = SparsityConfig(
        method="gradual", sparsity=0.75, initial_sparsity=0.25, scope="layerwise", end_step=4, update_interval=2
    )
    method = build_method(cfg)
    masks = apply_sparsity(model, cfg)
    for name, m in masks.items():
        assert m.numel() - int(m.sum()) == round(0.25 * m.numel()), name
    assert method.after_optimizer_step(model, masks, 1) is None  # not an update step
    with torch.no_grad():  # weights move between updates; pruned ones stay zero
        for name, p in model.named_parameters():
            if name in masks:
                p.add_(torch.randn_like(p) * 0.01).mul_(masks[name])
    new = method.after_optimizer_step(model, masks, 2)
    assert new.is_subset_of(masks)
    params = dict(model.named_parameters())
    for name, m in new.items():
        assert m.numel() - int(m.sum()) == round(cfg.sparsity_at(2) * m.numel()), name
        w = params[name].detach().abs()
        dropped = masks[name] & ~m
        assert w[m].min() >= w[dropped].max()
    assert method.after_optimizer_step(model, new, 3) is None
    final = method.after_optimizer_step(model, new, 4)
    assert all(m.numel() - int(m.sum()) == round(0.75 * m.numel()) for m in final.values())
    assert method.after_optimizer_step(model, final, 6) is None  # past end_step nothing changes


def test_config_round_trip(tmp_path):
    cfg = SparsityConfig(
        method="gradual",
        sparsity=0.9,
        initial_sparsity=0.3,
        start_step=5,
        end_step=50,
        update_interval=7,
        scope="layerwise",
        layer_rates={"classifier": 0.5},
    )
    cfg.save_pretrained(str(tmp_path))
    loaded = SparsityConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, GradualConfig) and loaded == cfg
    assert loaded.hashname() == cfg.hashname()


def test_resumed_run_prunes_as_an_uninterrupted_one(tmp_path):
    cfg = SparsityConfig(method="gradual", sparsity=0.7, start_step=0, end_step=8, update_interval=2)
    args = dict(save_strategy="steps", save_steps=3)
    full = _trainer(tmp_path / "full", cfg, max_steps=8, **args)
    full.train()
    cut = _trainer(tmp_path / "cut", cfg, max_steps=8, **args)
    cut.add_callback(StopAt(5))
    cut.train()  # "killed" after step 5; the last checkpoint is step 3
    resumed = _trainer(tmp_path / "cut", cfg, max_steps=8, **args)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path / "cut", "checkpoint-3"))
    assert resumed.masks == full.masks
    assert _pruned(full.masks) == round(0.7 * full.masks.numel())
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
