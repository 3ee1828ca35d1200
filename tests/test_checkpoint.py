"""Saving and loading: stock reload keeps zeros, resume from a Trainer checkpoint keeps masks, model cards."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import MODEL_BUILDERS, TinyCNN, ViolationCounter, make_dataset, training_args
from safetensors import safe_open
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, GPT2LMHeadModel

from hf_tickets import SparsityConfig, TicketTrainer, load_masks
from hf_tickets.config import CONFIG_NAME
from hf_tickets.enforce import count_violations
from hf_tickets.files import SPARSITY_REPORT_NAME as REPORT_NAME
from hf_tickets.masks import MASKS_NAME

STOCK_LOADERS = {
    "bert": AutoModelForSequenceClassification.from_pretrained,
    "vit": AutoModelForImageClassification.from_pretrained,
    "gpt2": GPT2LMHeadModel.from_pretrained,
    "cnn": TinyCNN.from_pretrained,  # a user's own PreTrainedModel, loaded the stock way
}


def _train(kind, out, cfg=None, steps=5, **args):
    model = MODEL_BUILDERS[kind]()
    trainer = TicketTrainer(
        model=model,
        args=training_args(out, **dict({"max_steps": steps, "weight_decay": 0.1}, **args)),
        train_dataset=make_dataset(kind, 16),
        sparsity_config=cfg or SparsityConfig(method="magnitude", sparsity=0.75),
    )
    return trainer


# ---- save -> stock reload -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "cnn"])
def test_save_then_stock_reload_keeps_zeros(kind, tmp_path):
    trainer = _train(kind, tmp_path / "run")
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    for name in ("model.safetensors", MASKS_NAME, CONFIG_NAME, REPORT_NAME, "README.md", "config.json"):
        assert (out / name).is_file(), name

    # the weights file holds exactly the keys a dense model's file holds, nothing mask-related. (transformers may
    # rename keys on save, e.g. ViT's legacy names in v5, so compare with a dense model saved the same way.)
    MODEL_BUILDERS[kind]().save_pretrained(str(tmp_path / "dense"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        saved_keys = list(fh.keys())
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), framework="pt") as fh:
        dense_keys = list(fh.keys())
    assert saved_keys == dense_keys
    assert not any("mask" in k or k.endswith("_orig") for k in saved_keys)

    reloaded, info = STOCK_LOADERS[kind](str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    masks = load_masks(out)
    assert masks == trainer.masks
    assert count_violations(reloaded, masks) == 0
    trained = trainer.model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert list(reloaded.state_dict()) == list(MODEL_BUILDERS[kind]().state_dict())
    assert SparsityConfig.from_pretrained(out) == trainer.sparsity_config


def test_masks_file_is_small_and_bit_packed(tmp_path):
    trainer = _train("bert", tmp_path / "run", steps=1)
    trainer.save_model(str(tmp_path / "out"))
    masks_bytes = os.path.getsize(tmp_path / "out" / MASKS_NAME)
    assert masks_bytes < trainer.masks.numel() / 8 + 16_384, "one bit per weight plus a header"


def test_reloaded_model_continues_sparse_training(tmp_path):
    trainer = _train("cnn", tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    model = TinyCNN.from_pretrained(str(tmp_path / "out"))
    masks = load_masks(tmp_path / "out")
    second = TicketTrainer(
        model=model,
        args=training_args(tmp_path / "run2", max_steps=5, weight_decay=0.1),
        train_dataset=make_dataset("cnn", 16),
        masks=masks,
        sparsity_config=SparsityConfig.from_pretrained(tmp_path / "out"),
    )
    counter = ViolationCounter(second.masks, model)
    second.add_callback(counter)
    second.train()
    assert counter.per_step == [0] * 5 and second.masks == masks


# ---- resume from a Trainer checkpoint -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "vit", "bert", "gpt2"])  # ViT: saved under other tensor names
def test_resume_from_checkpoint_keeps_masks(kind, tmp_path):
    run = tmp_path / "run"
    cfg = SparsityConfig(method="random", sparsity=0.8, seed=1)
    args = {"steps": 10, "save_strategy": "steps", "save_steps": 5, "learning_rate": 1e-2}
    first = _train(kind, run, cfg, **args)
    first.train()
    ckpt = run / "checkpoint-5"
    assert (ckpt / MASKS_NAME).is_file() and (ckpt / CONFIG_NAME).is_file()
    assert load_masks(ckpt) == first.masks
    final_uninterrupted = {k: v.clone() for k, v in first.model.state_dict().items()}

    # A fresh trainer with *different* masks (other seed) resumes: the checkpoint's masks win.
    second = _train(kind, tmp_path / "run2", SparsityConfig(method="random", sparsity=0.8, seed=2), **args)
    assert second.masks != first.masks

    class Count(ViolationCounter):
        def on_optimizer_step(self, args, state, control, **kwargs):
            self.per_step.append(count_violations(second.model, second.masks))

    count = Count(None, second.model)
    second.add_callback(count)
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.masks == first.masks
    assert second.sparsity_callback.masks is second.masks
    assert count.per_step == [0] * 5, "steps 6..10 only"
    assert second.state.global_step == 10
    # the resumed run ends where the uninterrupted one did (weights, hence masks applied identically)
    for key, value in second.model.state_dict().items():
        torch.testing.assert_close(value, final_uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)


def test_load_best_model_at_end_reads_vit_by_its_own_names(tmp_path):
    """Trainer's best-model load (`load_state_dict(strict=False)`) skips every tensor ViT saves under other names;
    TicketTrainer loads the best checkpoint's weights by name."""
    from hf_tickets.checkpoints import load_saved_weights

    args = training_args(
        tmp_path / "run",
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        learning_rate=0.5,
    )
    trainer = TicketTrainer(
        model=MODEL_BUILDERS["vit"](),
        args=args,
        train_dataset=make_dataset("vit", 16),
        eval_dataset=make_dataset("vit", 8),
        sparsity_config=SparsityConfig(method="random", sparsity=0.5, seed=0),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), "pick a run whose best step is not the last"
    expected = load_saved_weights(best, trainer.model)
    for name, tensor in trainer.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert count_violations(trainer.model, trainer.masks) == 0


def test_resume_from_last_checkpoint_with_true(tmp_path):
    run = tmp_path / "run"
    cfg = SparsityConfig(method="random", sparsity=0.6, seed=3)
    first = _train("cnn", run, cfg, steps=4, save_strategy="steps", save_steps=2)
    first.train()
    second = _train("cnn", run, SparsityConfig(method="random", sparsity=0.6, seed=4), steps=6, save_strategy="no")
    second.train(resume_from_checkpoint=True)  # picks checkpoint-4
    assert second.masks == first.masks
    assert count_violations(second.model, second.masks) == 0


def test_checkpoint_weights_hold_zeros(tmp_path):
    run = tmp_path / "run"
    first = _train("bert", run, steps=3, save_strategy="steps", save_steps=3)
    first.train()
    with safe_open(str(run / "checkpoint-3" / "model.safetensors"), framework="pt") as fh:
        for name, m in load_masks(run / "checkpoint-3").items():
            assert torch.all(fh.get_tensor(name)[~m] == 0), name


# ---- model card ---------------------------------------------------------------------------------------------------


def _front_matter(text):
    assert text.startswith("---\n")
    import yaml

    return yaml.safe_load(text.split("---\n", 2)[1])


def test_model_card_has_per_layer_sparsity_and_tags(tmp_path):
    trainer = _train("cnn", tmp_path / "run", SparsityConfig(sparsity=0.5, scope="layerwise"), steps=1)
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model(str(out))
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert "hf-tickets" in meta["tags"] and meta["library_name"] == "transformers"
    for name, value in trainer.masks.layer_sparsity().items():
        row = next(line for line in text.splitlines() if f"`{name}`" in line)
        assert f"{100 * value:.2f}%" in row
    assert f"{100 * trainer.masks.sparsity():.2f}%" in text
    assert "magnitude" in text and "layerwise" in text


def test_existing_model_card_is_updated_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags:\n- my-tag\n---\n\n# My model\n\nHand-written notes that must survive.\n"
    )
    trainer = _train("cnn", tmp_path / "run", steps=1)
    trainer.train()
    trainer.save_model(str(out))
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["license"] == "apache-2.0"
    assert {"my-tag", "hf-tickets"} <= set(meta["tags"])
    assert "# My model" in text and "Hand-written notes that must survive." in text
    assert text.count("<!-- hf_tickets:start -->") == 1

    # a second save replaces the section in place rather than appending another one
    trainer.save_model(str(out))
    again = (out / "README.md").read_text()
    assert again.count("<!-- hf_tickets:start -->") == 1 and again.count("Per-layer sparsity") == 1
    assert "Hand-written notes that must survive." in again


def test_existing_card_without_front_matter(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# Plain readme\n\nNo metadata here.\n")
    trainer = _train("cnn", tmp_path / "run", steps=1)
    trainer.save_model(str(out))
    text = (out / "README.md").read_text()
    assert "No metadata here." in text and "hf-tickets" in _front_matter(text)["tags"]


def test_checkpoints_do_not_write_a_card(tmp_path):
    run = tmp_path / "run"
    trainer = _train("cnn", run, steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    assert not (run / "checkpoint-2" / "README.md").exists()
    assert json.loads((run / "checkpoint-2" / REPORT_NAME).read_text())["sparsity"] == pytest.approx(
        trainer.masks.sparsity()
    )


def test_resume_true_skips_a_checkpoint_torn_by_a_kill(tmp_path):
    """A process killed while Trainer writes a checkpoint leaves a newest folder without trainer_state.json;
    resume_from_checkpoint=True resumes from the last complete one (stock Trainer would fail on the torn one)."""
    from conftest import make_cnn, make_dataset, training_args

    from hf_tickets import SparsityConfig, TicketTrainer
    from hf_tickets.checkpoints import last_complete_checkpoint

    def build(max_steps):
        return TicketTrainer(
            model=make_cnn(),
            args=training_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2),
            train_dataset=make_dataset("cnn", 32),
            sparsity_config=SparsityConfig(sparsity=0.5),
        )

    build(4).train()
    torn = tmp_path / "checkpoint-6"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # cut mid-write
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    resumed = build(6)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert last_complete_checkpoint(str(tmp_path / "nothing")) is None
