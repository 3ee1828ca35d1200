"""Layer collapse is said out loud: a tensor pruned below 1% of its weights, or with an output row that keeps no
weight, gets a warning naming it and the remedies, for every method (the check runs where masks are set)."""

from __future__ import annotations

import logging

import torch
from conftest import make_cnn, make_dataset, training_args

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer


def test_collapsed_names_tiny_density_and_dead_rows():
    masks = MaskSet(
        {
            "a.weight": torch.zeros(10, 20, dtype=torch.bool),
            "b.weight": torch.ones(4, 5, dtype=torch.bool).index_fill_(0, torch.tensor([1]), False),
            "c.weight": torch.ones(4, 5, dtype=torch.bool),
        }
    )
    collapsed = masks.collapsed()
    assert set(collapsed) == {"a.weight", "b.weight"}
    assert "0.00%" in collapsed["a.weight"] and "1 of its 4 output units" in collapsed["b.weight"]


def test_conv1d_output_units_are_its_columns():
    mask = torch.ones(4, 6, dtype=torch.bool)  # transformers Conv1D: [in, out]
    mask[2, :] = False  # an input feature unused: not a cut
    assert MaskSet({"c.weight": mask}).collapsed(input_dims={"c.weight": 0}) == {}
    mask[:, 5] = False  # an output unit fed by nothing
    assert "1 of its 6 output units" in MaskSet({"c.weight": mask}).collapsed(input_dims={"c.weight": 0})["c.weight"]


def test_dead_output_units_counts_every_weight_matrix_and_conv():
    conv = torch.ones(6, 1, 5, 5, dtype=torch.bool)
    conv[[0, 3]] = False  # two filters keep nothing
    conv[1, 0, 0, 1:] = False  # one keeps a single weight: alive
    masks = MaskSet(
        {"conv.weight": conv, "fc.weight": torch.ones(3, 4, dtype=torch.bool), "bias": torch.ones(3).bool()}
    )
    assert masks.dead_output_units() == {"conv.weight": 2, "fc.weight": 0}
    masks["fc.weight"][0] = False  # a row fed by nothing
    assert masks.dead_output_units() == {"conv.weight": 2, "fc.weight": 1}


def test_global_pruning_that_cuts_a_layer_warns_with_remedies(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        TicketTrainer(
            model=make_cnn(),
            args=training_args(tmp_path),
            train_dataset=make_dataset("cnn"),
            sparsity_config=SparsityConfig(method="random", sparsity=0.995),
        )
    assert "Layer collapse" in caplog.text and "exclude_modules" in caplog.text and "layerwise" in caplog.text


def test_healthy_masks_do_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        TicketTrainer(
            model=make_cnn(),
            args=training_args(tmp_path),
            train_dataset=make_dataset("cnn"),
            sparsity_config=SparsityConfig(sparsity=0.5, scope="layerwise"),
        )
    assert "Layer collapse" not in caplog.text


def test_card_flags_collapsed_tensors(tmp_path):
    trainer = TicketTrainer(
        model=make_cnn(),
        args=training_args(tmp_path),
        train_dataset=make_dataset("cnn"),
        sparsity_config=SparsityConfig(method="random", sparsity=0.995),
    )
    trainer.save_model(str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "collapsed:" in card and "layer collapse" in card
