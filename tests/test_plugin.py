"""The method interface from the outside: a toy method registered outside the package trains end to end, its state
survives a checkpoint, and a resumed run equals an uninterrupted one (weights, masks, logs)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import StopAt, count_violations_of, make_cnn, make_dataset, training_args
from toy_method import ToyConfig, ToyMethod
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, register_method
from hf_tickets.methods import available_methods


def _trainer(out, max_steps, **args):
    return TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=max_steps, **args),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=SparsityConfig(method="toy_grow_prune", every=2, seed=3),
    )


def test_registered_method_builds_its_config_and_validates_its_fields():
    assert "toy_grow_prune" in available_methods()
    cfg = SparsityConfig(method="toy_grow_prune", every=3)
    assert isinstance(cfg, ToyConfig) and cfg.every == 3
    with pytest.raises(ValueError, match="every"):
        SparsityConfig(method="toy_grow_prune", every=0)
    with pytest.raises(TypeError, match="every belongs to method='toy_grow_prune'"):
        SparsityConfig(method="magnitude", sparsity=0.5, every=3)
    with pytest.raises(ValueError, match="already registered"):
        register_method("toy_grow_prune", ToyConfig, type("Other", (ToyMethod,), {}))


def test_toy_method_trains_end_to_end(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6)
    method = trainer.sparsity_method
    assert method.batches_seen == 1, "initial_masks got batches of the trainer's own dataloader"
    output = trainer.train()
    assert isinstance(output, TrainOutput)
    assert method.steps_seen == 6
    # the hook saw dense gradients: pruned entries still had gradient before enforcement zeroed it
    assert sum(method.dense_grad_nonzero_in_pruned[2:]) > 0
    kept = trainer.masks.report()
    assert kept["numel"] - kept["kept"] == 3 * len(trainer.masks), "one weight per tensor pruned every 2 steps"
    assert count_violations_of(trainer) == 0
    trainer.save_model(str(tmp_path / "final"))
    assert MaskSet.load(str(tmp_path / "final")) == trainer.masks
    assert SparsityConfig.from_pretrained(str(tmp_path / "final")) == trainer.sparsity_config


class _Snapshot(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_resumed_run_equals_uninterrupted(tmp_path):
    """Method state (counter, RNG), masks, weights and logs after a resume equal those of one uninterrupted run."""
    args = dict(save_strategy="steps", save_steps=3, logging_steps=1)
    full = _trainer(tmp_path / "full", max_steps=8, **args)
    full.train()

    first = _trainer(tmp_path / "cut", max_steps=8, **args)
    stop = StopAt(5)
    first.add_callback(stop)
    first.train()  # "killed" after step 5; the last checkpoint is step 3
    second = _trainer(tmp_path / "cut", max_steps=8, **args)
    second.train(resume_from_checkpoint=os.path.join(tmp_path / "cut", "checkpoint-3"))

    assert second.masks == full.masks
    assert second.sparsity_method.steps_seen == full.sparsity_method.steps_seen
    for (name, a), b in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name

    def strip(history):
        # as transformers' own resume tests: the run summary (loss average, timing, flos) covers one train() call
        summary = ("runtime", "per_second", "train_loss", "total_flos")
        return [{k: v for k, v in e.items() if not any(s in k for s in summary)} for e in history]

    assert strip(second.state.log_history) == strip(full.state.log_history)
    assert any(k.startswith("sparsity/") for e in full.state.log_history for k in e)


def test_restore_callback_states_keeps_the_methods_callback(tmp_path):
    """With restore_callback_states_from_checkpoint=True Trainer rebuilds stateful callbacks; ours must stay."""
    args = dict(save_strategy="steps", save_steps=2)
    _trainer(tmp_path, max_steps=2, **args).train()
    resumed = _trainer(tmp_path, max_steps=4, restore_callback_states_from_checkpoint=True, **args)
    callback = resumed.sparsity_callback
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    assert callback in resumed.callback_handler.callbacks
    assert resumed.sparsity_method.steps_seen == 4
    assert count_violations_of(resumed) == 0


def test_reading_batches_for_initial_masks_does_not_shift_training(tmp_path):
    """A data-driven method reads batches when the trainer is built; training must see the same data order."""
    with_data = _trainer(tmp_path / "a", max_steps=3)
    with_data.sparsity_method.batches_seen = 0
    before = torch.random.get_rng_state()
    batches = with_data._train_batches()
    next(batches)
    batches.close()
    assert torch.equal(torch.random.get_rng_state(), before)
