"""Drop-in: built like `Trainer`, `TicketTrainer` is `Trainer` (callbacks, logs, outputs, checkpoints).

The full check runs transformers' own Trainer tests with Trainer replaced (scripts/upstream_trainer_tests.py,
results in docs/drop_in.md); these tests pin the causes found there.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import transformers
from conftest import count_violations_of, make_cnn, make_dataset, training_args
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from hf_tickets import SparsityCallback, SparsityConfig, TicketTrainer


class Regression(nn.Module):
    """Like transformers' RegressionModel: two scalar parameters, nothing Linear or Conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None):
        y = input_x * self.a + self.b
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, generator=g)
        self.y = 2.0 * self.x + 3.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


def _callback_types(trainer):
    return [type(cb) for cb in trainer.callback_handler.callbacks]


def _run(cls, out, model=None, **kwargs):
    args = training_args(out, max_steps=6, save_strategy="steps", save_steps=3)
    trainer = cls(model=model or make_cnn(), args=args, train_dataset=make_dataset("cnn", 32), **kwargs)
    return trainer, trainer.train()


def _history(trainer):
    return [
        {k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in trainer.state.log_history
    ]


@pytest.mark.parametrize(
    "sparsity_kwargs", [{}, {"sparsity_config": SparsityConfig(sparsity=0.0)}], ids=["none", "0.0"]
)
def test_built_like_trainer_it_is_trainer(tmp_path, sparsity_kwargs):
    stock, stock_out = _run(Trainer, tmp_path / "stock")
    ticket, ticket_out = _run(TicketTrainer, tmp_path / "ticket", **sparsity_kwargs)
    assert _callback_types(ticket) == _callback_types(stock)
    assert ticket.sparsity_callback is None
    assert isinstance(ticket_out, TrainOutput) and ticket_out.training_loss == stock_out.training_loss
    assert _history(ticket) == _history(stock)
    for (name, a), b in zip(stock.model.named_parameters(), ticket.model.parameters()):
        assert torch.equal(a, b), name
    assert sorted(os.listdir(tmp_path / "ticket" / "checkpoint-3")) == sorted(
        os.listdir(tmp_path / "stock" / "checkpoint-3")
    )


def test_masked_trainer_registers_one_callback_and_logs_sparsity(tmp_path):
    ticket, _ = _run(TicketTrainer, tmp_path, sparsity_config=SparsityConfig(sparsity=0.5))
    assert sum(isinstance(cb, SparsityCallback) for cb in ticket.callback_handler.callbacks) == 1
    assert all("sparsity" in e for e in ticket.state.log_history if "loss" in e)
    assert os.path.isfile(tmp_path / "checkpoint-3" / "masks.safetensors")


def test_model_with_nothing_prunable_trains_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        trainer = TicketTrainer(
            model=Regression(),
            args=training_args(tmp_path, max_steps=20, learning_rate=0.1),
            train_dataset=RegressionData(),
            sparsity_config=SparsityConfig(sparsity=0.5),
        )
    assert "no Linear/Conv weight to prune" in caplog.text
    output = trainer.train()
    assert isinstance(output, TrainOutput) and trainer.sparsity_callback is None
    assert float(trainer.model.a) != 0.0, "it trained"


def test_explicit_target_modules_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        _run(TicketTrainer, tmp_path, sparsity_config=SparsityConfig(sparsity=0.5, target_modules=["nope"]))


def test_model_init_recomputes_masks_for_every_model(tmp_path):
    built = []

    def model_init():
        built.append(make_cnn(seed=len(built)))
        return built[-1]

    trainer = TicketTrainer(
        model_init=model_init,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=SparsityConfig(sparsity=0.6),
    )
    first_masks = trainer.masks
    trainer.train()  # Trainer builds a new model from model_init here
    assert len(built) == 2 and trainer.model is built[1]
    assert trainer.masks is not first_masks, "masks were recomputed for the new model"
    assert trainer.masks.sparsity() == pytest.approx(0.6, abs=1e-3)
    assert count_violations_of(trainer) == 0


def test_imp_train_returns_train_output_with_the_level_summary(tmp_path):
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(tmp_path, max_steps=3),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(method="imp", levels=1),
    )
    output = trainer.train()
    assert isinstance(output, TrainOutput)
    assert output.metrics["level"] == 1 and output.metrics["sparsity"] == pytest.approx(0.2, abs=1e-3)


def test_imp_does_not_recurse_when_transformers_trainer_is_rebound(tmp_path, monkeypatch):
    """Test harnesses and other extensions rebind transformers.Trainer; the level loop must not call through it."""

    class Rebound(TicketTrainer):
        pass

    monkeypatch.setattr(transformers, "Trainer", Rebound)
    monkeypatch.setattr(transformers.trainer, "Trainer", Rebound)
    trainer = Rebound(
        model=make_cnn(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(method="imp", levels=1),
    )
    assert isinstance(trainer.train(), TrainOutput)


def test_private_trainer_methods_we_override_still_exist():
    """TicketTrainer overrides one private Trainer method; fail loudly on a transformers release without it."""
    assert callable(getattr(Trainer, "_load_callback_state", None)), (
        f"transformers {transformers.__version__} has no Trainer._load_callback_state: TicketTrainer's override "
        "(keeping SparsityCallback on restore_callback_states_from_checkpoint) must be revisited."
    )
