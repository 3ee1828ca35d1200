"""LoRA adapters (peft) on sparse base models: targets, exact base sparsity, masked LoRA, merges, save/load, errors.

A tiny random BERT (conftest) wrapped with peft's real LoRA; everything on CPU in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
from conftest import make_bert, make_dataset, training_args  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from hf_tickets import (  # noqa: E402
    SparsityConfig,
    TicketTrainer,
    apply_sparsity,
    enable_masked_lora,
    load_masks,
    load_sparse_adapter,
    merge_adapters,
    save_sparse_adapter,
)
from hf_tickets.enforce import count_violations  # noqa: E402
from hf_tickets.kernels import MultiTensorMasker  # noqa: E402
from hf_tickets.methods import build_method  # noqa: E402
from hf_tickets.peft_interop import effective_weights, masks_for  # noqa: E402
from hf_tickets.peft_methods import OnEffectiveWeights  # noqa: E402
from hf_tickets.sparsify import initial_masks  # noqa: E402
from hf_tickets.targets import resolve_targets  # noqa: E402

LORA_MODULES = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def lora_bert(seed: int = 0, masked: bool = False, **lora_kwargs):
    """Tiny BERT + LoRA (classifier trained in full as modules_to_save, as peft does for SEQ_CLS)."""
    kwargs = {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": LORA_MODULES, **lora_kwargs}
    model = get_peft_model(make_bert(seed), LoraConfig(**kwargs))
    if masked:
        enable_masked_lora(model)
    return model


def randomize_adapters(model, seed: int = 1, std: float = 0.3) -> None:
    """Nonzero lora_B (peft starts it at zero), so ΔW is dense and large enough to see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def batch(n: int = 4, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, 8), generator=g), "attention_mask": torch.ones(n, 8, dtype=int)}


def violations(model, masks) -> int:
    return count_violations(model, masks_for(model, masks))


def nm_valid(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most n nonzeros in every group of m consecutive inputs (dim 1) of a [out, in] weight."""
    groups = weight.detach().reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(dim=-1) <= n).all())


def train(model, tmp_path, config=None, steps: int = 4, **kwargs) -> TicketTrainer:
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=steps, **kwargs),
        train_dataset=make_dataset("bert"),
        sparsity_config=config,
    )
    trainer.train()
    return trainer


# ---- targets ---------------------------------------------------------------------------------------------------


def test_default_targets_are_the_base_weights_never_adapters():
    model = lora_bert()
    targets = resolve_targets(model, SparsityConfig(sparsity=0.5))
    assert targets, "nothing targeted"
    for name in targets:
        assert "lora_" not in name and "modules_to_save" not in name and "original_module" not in name, name
    # The same base weights as the plain model's defaults (its classifier is peft's trained modules_to_save copy).
    plain = {n for n in resolve_targets(make_bert(), SparsityConfig(sparsity=0.5)) if not n.startswith("classifier")}
    assert {n.replace("base_model.model.", "").replace(".base_layer", "") for n in targets} == plain
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight" in targets
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.weight" in targets  # not adapted: itself


def test_explicit_targets_reach_base_weights_through_wrappers():
    model = lora_bert()
    # The base model's names keep working: the wrapper `query` means its base weight.
    targets = resolve_targets(model, SparsityConfig(sparsity=0.5, target_modules=["query"]))
    assert sorted(targets) == [
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.base_layer.weight" for i in range(2)
    ]
    # A regex matching adapter modules too still never targets them.
    targets = resolve_targets(model, SparsityConfig(sparsity=0.5, target_modules=r".*attention.*"))
    assert targets and not any("lora_" in n for n in targets)
    excluded = resolve_targets(model, SparsityConfig(sparsity=0.5, exclude_modules=["query", "pooler.dense"]))
    assert not any(".query." in n or "pooler" in n for n in excluded)
    with pytest.raises(ValueError, match="adapter weights .* are never pruned"):
        resolve_targets(model, SparsityConfig(sparsity=0.5, target_modules=["lora_A", "lora_B"]))


# ---- training: exact sparsity, dense trainable adapters, no wasted enforcement -----------------------------------


def test_frozen_sparse_base_stays_exact_and_adapters_train(tmp_path, monkeypatch):
    model = lora_bert()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    calls = []
    original = MultiTensorMasker.zero_pruned_
    monkeypatch.setattr(
        MultiTensorMasker, "zero_pruned_", lambda self, targets: (calls.append(len(targets)), original(self, targets))
    )
    trainer = train(model, tmp_path, steps=5)
    assert trainer.masks == masks and trainer.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    assert violations(model, masks) == 0
    params = dict(model.named_parameters())
    for name, before in base_before.items():  # frozen: bit for bit what pruning left
        assert torch.equal(params[name], before), name
    moved = [n for n, before in adapters_before.items() if not torch.equal(params[n], before)]
    assert len(moved) == len(adapters_before)  # every adapter trained ...
    for name in adapters_before:
        if "lora_B" in name:  # ... and stayed dense (B starts at zero, so its entries all moved off it)
            assert bool((params[name] != 0).all()), name
    # Enforcement wrote the frozen base when the trainer was built and at train begin, at none of the 5 steps.
    assert len(calls) == 2


def test_masked_lora_training_keeps_merge_exact(tmp_path):
    model = lora_bert(masked=True)
    trainer = train(model, tmp_path, SparsityConfig(sparsity=0.5), steps=6, learning_rate=5e-2)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    masks = trainer.masks
    merged, report = merge_adapters(model)
    assert report.masked_lora and report.delta_norm > 0 and report.removed_norm == 0.0
    assert violations(merged, masks) == 0
    with torch.no_grad():
        after = merged(**inputs).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# ---- merges ----------------------------------------------------------------------------------------------------


def test_naive_merge_breaks_sparsity_and_merge_adapters_restores_it():
    model = lora_bert()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    randomize_adapters(model)
    naive = lora_bert()
    apply_sparsity(naive, SparsityConfig(sparsity=0.5))
    naive.load_state_dict(model.state_dict())
    dense_again = naive.merge_and_unload()
    assert violations(dense_again, masks) > 0.4 * masks.numel() * masks.sparsity()  # most pruned entries came back

    merged, report = merge_adapters(model)
    assert violations(merged, masks) == 0
    assert not report.masked_lora
    assert 0.3 < report.removed_fraction < 0.9  # about half of a dense ΔW sits where the mask prunes
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    assert layer in report.layers and report.layers[layer]["removed_norm"] > 0


def test_masked_lora_merge_equals_unmerged_logits():
    model = lora_bert(masked=True)
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.6))
    randomize_adapters(model)
    model.eval()
    inputs = batch()
    with torch.no_grad():
        unmerged = model(**inputs).logits
    merged, report = merge_adapters(model)
    assert report.removed_norm == 0.0 and report.delta_norm > 1.0
    assert violations(merged, masks) == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_nm_pattern_valid_after_merge():
    model = lora_bert(masked=True)
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    randomize_adapters(model)
    naive = lora_bert()
    naive.load_state_dict(model.state_dict())
    naive_merged = naive.merge_and_unload()
    merged, _ = merge_adapters(model)
    merged_masks = masks_for(merged, masks)
    params, naive_params = dict(merged.named_parameters()), dict(naive_merged.named_parameters())
    adapted = [n for n in merged_masks if ".query." in n or ".value." in n or "dense" in n]
    assert adapted
    for name in merged_masks:
        assert nm_valid(params[name]), name
    assert not all(nm_valid(naive_params[n]) for n in adapted)  # a plain merge loses 2:4


def test_masked_lora_on_gpt2_conv1d_keeps_2_4_and_logits():
    """transformers' Conv1D stores [in, out]: LoRA runs with fan_in_fan_out and 2:4 groups run along dim 0."""
    from conftest import make_gpt2

    model = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    enable_masked_lora(model)
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    randomize_adapters(model)
    model.eval()
    inputs = {"input_ids": batch()["input_ids"]}
    with torch.no_grad():
        unmerged = model(**inputs).logits
    merged, report = merge_adapters(model)
    assert report.removed_norm == 0.0 and report.delta_norm > 1.0
    merged_masks = masks_for(merged, masks)
    assert count_violations(merged, merged_masks) == 0
    params = dict(merged.named_parameters())
    assert all(nm_valid(params[n].t()) for n in merged_masks)  # groups of 4 inputs: rows of the [in, out] weight
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)


# ---- methods that change masks ---------------------------------------------------------------------------------


def test_imp_scores_the_effective_weight_and_restores_w():
    model = lora_bert()
    randomize_adapters(model, std=1.0)
    # IMP's level-end scoring, wrapped as prepare_method wraps methods for peft models (whole IMP runs on a LoRA
    # model: tests/test_peft_imp.py).
    config = SparsityConfig(method="imp", prune_fraction=0.5, levels=1, scope="layerwise")
    method = OnEffectiveWeights(build_method(config))
    level0 = initial_masks(model, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = method.next_level_masks(model, level0, 1)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # W is put back exactly
    with effective_weights(model):
        effective = {n: p.detach().abs().clone() for n, p in model.named_parameters() if n in new}
    name = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"
    keep = new[name]
    assert keep.float().mean() == pytest.approx(0.5, abs=0.01)
    assert effective[name][keep].min() >= effective[name][~keep].max()  # the largest |W + ΔW| survive
    assert not torch.equal(keep, before[name].abs() >= before[name].abs().median())  # not |W| alone


def test_gradual_magnitude_on_a_masked_lora_model(tmp_path):
    model = lora_bert(masked=True)
    config = SparsityConfig(method="gradual", sparsity=0.5, start_step=1, end_step=4, update_interval=1)
    trainer = train(model, tmp_path, config, steps=5)
    assert trainer.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    assert violations(model, trainer.masks) == 0
    assert model.hf_tickets_masked_lora.masks is trainer.masks  # the adapters follow every mask update


def test_rigl_trains_a_base_that_is_not_frozen(tmp_path):
    model = lora_bert()
    for name, p in model.named_parameters():
        if "base_layer" in name or name.endswith("key.weight"):
            p.requires_grad_(True)
    config = SparsityConfig(method="rigl", sparsity=0.5, update_interval=2, target_modules=["query", "value", "key"])
    trainer = train(model, tmp_path, config, steps=4)
    assert violations(model, trainer.masks) == 0
    assert trainer.masks.sparsity() == pytest.approx(0.5, abs=1e-3)


# ---- combinations that cannot hold -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_methods_that_cannot_hold_on_a_lora_base_are_rejected(method, tmp_path):
    # IMP is accepted on a frozen LoRA base (tests/test_peft_imp.py), and refused where it cannot hold there.
    with pytest.raises(ValueError, match="frozen"):
        TicketTrainer(
            model=lora_bert(),
            args=training_args(tmp_path),
            train_dataset=make_dataset("bert"),
            sparsity_config=SparsityConfig(method=method, sparsity=0.5),
        )


def test_masked_lora_rejects_what_it_cannot_mask():
    with pytest.raises(ValueError, match="LoRA variant"):
        lora_bert(masked=True, use_dora=True)
    embedding = get_peft_model(make_bert(), LoraConfig(r=2, target_modules=["word_embeddings", "query"]))
    with pytest.raises(ValueError, match="Linear layers"):
        enable_masked_lora(embedding)
    with pytest.raises(ValueError, match="no LoRA layer"):
        enable_masked_lora(make_bert())


def test_merge_needs_a_peft_model_and_masks():
    with pytest.raises(ValueError, match="peft model"):
        merge_adapters(make_bert())
    with pytest.raises(ValueError, match="masks"):
        merge_adapters(lora_bert())


# ---- saving and loading ----------------------------------------------------------------------------------------


def test_trainer_save_and_load_round_trip(tmp_path):
    model = lora_bert(masked=True)
    config = SparsityConfig(pattern="2:4")
    trainer = train(model, tmp_path, config, steps=4, learning_rate=5e-2)
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    for file in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "sparsity_config.json"):
        assert (folder / file).is_file(), file
    assert not (folder / "model.safetensors").exists()  # the base is the pretrained model: not copied
    model.eval()
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits

    loaded = load_sparse_adapter(make_bert(0), str(folder))  # the dense base, as from_pretrained gives it
    loaded.eval()
    assert loaded.hf_tickets_masked_lora is not None  # masked LoRA comes back on
    assert load_masks(str(folder)) == trainer.masks
    assert SparsityConfig.from_pretrained(str(folder)) == config
    assert violations(loaded, trainer.masks) == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    merged, report = merge_adapters(loaded)
    assert report.removed_norm == 0.0
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_sparse_adapter_and_load_from_a_hub_repo_id(tmp_path, monkeypatch):
    """The Hub path: a repo id resolved through the HF cache, offline (the suite reaches no network)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = lora_bert()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    randomize_adapters(model)
    folder = tmp_path / "saved"
    save_sparse_adapter(model, str(folder), sparsity_config=SparsityConfig(sparsity=0.5))
    assert {"adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "sparsity_config.json"} <= set(
        os.listdir(folder)
    )
    # A Hub cache entry for acme/sparse-lora at one commit, laid out as huggingface_hub writes it.
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--sparse-lora" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cache / "models--acme--sparse-lora" / "refs").mkdir()
    (cache / "models--acme--sparse-lora" / "refs" / "main").write_text(commit)
    for file in os.listdir(folder):
        (snapshot / file).write_bytes((folder / file).read_bytes())
    loaded = load_sparse_adapter(make_bert(0), "acme/sparse-lora", cache_dir=str(cache))
    assert not hasattr(loaded, "hf_tickets_masked_lora")  # saved without masked LoRA
    assert masks_for(loaded, load_masks("acme/sparse-lora", cache_dir=str(cache))) == masks
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits, rtol=1e-5, atol=1e-5)


def test_package_imports_and_trains_without_peft(tmp_path):
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "import torch, hf_tickets\n"
        "from hf_tickets.targets import resolve_targets\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "m = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=32))\n"
        "masks = hf_tickets.apply_sparsity(m, hf_tickets.SparsityConfig(sparsity=0.5))\n"
        "assert 'peft' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(len(masks))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "8"


# ---- recipes ---------------------------------------------------------------------------------------------------


def test_recipe_peft_section_is_checked():
    from hf_tickets.peft_interop import wrap_with_lora

    model = wrap_with_lora(make_bert(), {"r": 2, "target_modules": ["query"], "masked": True})
    assert model.hf_tickets_masked_lora is not None
    assert model.peft_config["default"].task_type == "SEQ_CLS"  # implied for a sequence classifier
    with pytest.raises(ValueError, match="peft.masked='yes' must be true or false"):
        wrap_with_lora(make_bert(), {"r": 2, "target_modules": ["query"], "masked": "yes"})
    with pytest.raises(ValueError, match="does not fit peft.LoraConfig.*rank"):
        wrap_with_lora(make_bert(), {"rank": 2})
    with pytest.raises(ValueError, match="must be a mapping"):
        wrap_with_lora(make_bert(), [2])
