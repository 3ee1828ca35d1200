"""Runs never mix: a restart into a folder whose recorded run identity differs is refused before training, with the
differing fields named; an identical restart reuses the finished levels; more levels extend the run."""

from __future__ import annotations

import json
import os

import pytest
from conftest import make_cnn, make_dataset, training_args

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.lottery import run_controls
from hf_tickets.lottery.identity import IDENTITY_NAME


def _imp(out, levels=1, seed=0, max_steps=2, **args):
    return TicketTrainer(
        model=make_cnn(seed=seed),
        args=training_args(out, max_steps=max_steps, **args),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(method="imp", levels=levels, rewind="init"),
    )


def _mtime(path):
    return os.path.getmtime(os.path.join(path, "metrics.json"))


def test_identical_restart_reuses_and_more_levels_extend(tmp_path):
    _imp(tmp_path, levels=1).train()
    assert os.path.isfile(tmp_path / IDENTITY_NAME)
    done = _mtime(tmp_path / "level_01")
    _imp(tmp_path, levels=1).train()
    assert _mtime(tmp_path / "level_01") == done, "an identical restart trains nothing"
    _imp(tmp_path, levels=2).train()
    assert _mtime(tmp_path / "level_01") == done and (tmp_path / "level_02" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_steps": 3}, "training.max_steps"),
        ({"learning_rate": 0.5}, "training.learning_rate"),
        ({"seed": 1}, "model.init_sha256"),
    ],
)
def test_changed_identity_is_refused_naming_the_field(tmp_path, change, field):
    _imp(tmp_path).train()
    kwargs = dict(change)
    seed = kwargs.pop("seed", 0)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        _imp(tmp_path, seed=seed, **kwargs).train()
    assert "new output_dir" in str(err.value)


def test_changed_pruning_settings_are_refused(tmp_path):
    _imp(tmp_path).train()
    other = TicketTrainer(
        model=make_cnn(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(method="imp", levels=1, prune_fraction=0.5),
    )
    with pytest.raises(ValueError, match=r"sparsity\.prune_fraction: 0\.2 -> 0\.5"):
        other.train()


def test_controls_after_train_use_the_runs_theta0_and_refuse_other_steps(tmp_path):
    trainer = _imp(tmp_path)
    trainer.train()
    run_controls(trainer, "reinit")  # the trainer now holds trained weights: theta_0 is still the run's
    assert (tmp_path.parent / f"{tmp_path.name}.reinit" / "level_01" / "metrics.json").is_file()
    other = _imp(tmp_path, max_steps=3)
    with pytest.raises(ValueError, match=r"training\.max_steps"):
        run_controls(other, "random_prune")


def test_identity_file_is_readable_json(tmp_path):
    _imp(tmp_path).train()
    identity = json.loads((tmp_path / IDENTITY_NAME).read_text())
    assert set(identity) == {"sparsity", "training", "model", "data"}
    assert "levels" not in identity["sparsity"] and identity["training"]["max_steps"] == 2


def test_levels_without_a_recorded_identity_are_not_reused(tmp_path):
    _imp(tmp_path).train()
    os.remove(tmp_path / IDENTITY_NAME)  # as a folder written before identities were recorded
    with pytest.raises(ValueError, match="cannot be checked"):
        _imp(tmp_path).train()
