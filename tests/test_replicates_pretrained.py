"""Replicates of a model fine-tuned from a pretrained checkpoint repeat the fine-tuning under another seed: each
starts from the checkpoint's weights with its own new head (what `set_seed(s); from_pretrained(...)` gives), not
from a random re-draw of the whole pretrained model."""

from __future__ import annotations

import logging

import torch
from conftest import NUM_LABELS, make_bert, make_dataset, training_args
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.lottery import run_experiment

HEAD = ("classifier.weight", "classifier.bias")


def _pretrained(tmp_path) -> str:
    """conftest's tiny BERT body saved as a checkpoint: loading it for classification draws a new head."""
    folder = str(tmp_path / "pretrained")
    make_bert(seed=123).bert.save_pretrained(folder)
    return folder


def _run(out, model, replicates: int = 3) -> list[dict]:
    trainer = TicketTrainer(
        model=model,
        args=training_args(out, max_steps=2),
        train_dataset=make_dataset("bert"),
        eval_dataset=make_dataset("bert", n=8, seed=1),
        sparsity_config=SparsityConfig(method="imp", levels=1, prune_fraction=0.2),
    )
    run_experiment(trainer, replicates=replicates)
    return [load_file(out / f"replicate_{r}" / "init_weights.safetensors") for r in range(replicates)]


def test_each_replicate_keeps_the_checkpoint_and_draws_its_own_head(tmp_path, caplog):
    source = _pretrained(tmp_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=NUM_LABELS)
    template = {n: t.clone() for n, t in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="hf_tickets"):
        init = _run(tmp_path / "run", model)

    body = [n for n in template if n not in HEAD]
    assert body and all(torch.equal(init[r][n], template[n]) for r in range(3) for n in body)
    assert all(torch.equal(init[0][n], template[n]) for n in HEAD), "replicate 0 is the model as given"
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(init[a]["classifier.weight"], init[b]["classifier.weight"]), (a, b)
    assert "drawn under the replicate's seed: classifier.bias, classifier.weight" in caplog.text

    # the same seed draws the same head: a second run of the experiment is the same experiment
    again = _run(tmp_path / "again", BertForSequenceClassification.from_pretrained(source, num_labels=NUM_LABELS))
    assert all(torch.equal(again[r]["classifier.weight"], init[r]["classifier.weight"]) for r in (1, 2))


def test_a_model_whose_weights_left_its_checkpoint_is_redrawn_whole_and_says_so(tmp_path, caplog):
    source = _pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=NUM_LABELS)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(2.0)  # no longer the checkpoint's weights
    template = {n: t.clone() for n, t in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        init = _run(tmp_path / "run", model, replicates=2)
    assert "differ from its checkpoint" in caplog.text
    encoder = [n for n in template if n.startswith("bert.encoder.") and n.endswith("weight") and "LayerNorm" not in n]
    assert all(not torch.equal(init[1][n], template[n]) for n in encoder)
