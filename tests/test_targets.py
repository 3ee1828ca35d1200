"""targets.resolve_targets: which parameters are prunable, with peft's module-name matching rules."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPECTED_DEFAULT_TARGETS, MODEL_BUILDERS
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tickets import SparsityConfig
from hf_tickets.targets import module_matches, module_name_of, rate_factor, resolve_targets


def cfg(**kwargs) -> SparsityConfig:
    return SparsityConfig(sparsity=0.5, **kwargs)


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "cnn"])
def test_default_targets_without_model_specific_code(kind):
    model = MODEL_BUILDERS[kind]()
    targets = resolve_targets(model, cfg())
    assert list(targets) == EXPECTED_DEFAULT_TARGETS[kind]
    params = dict(model.named_parameters())
    for name, p in targets.items():
        assert p is params[name], "targets must be the model's own Parameter objects"


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "cnn"])
def test_defaults_never_take_biases_norms_or_embeddings(kind):
    model = MODEL_BUILDERS[kind]()
    targets = resolve_targets(model, cfg())
    modules = dict(model.named_modules())
    for name in targets:
        assert name.endswith(".weight")
        assert isinstance(modules[module_name_of(name)], (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D))
    for name, module in modules.items():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.BatchNorm2d)):
            assert f"{name}.weight" not in targets


def test_default_types_are_listed():
    from hf_tickets.targets import DEFAULT_TARGET_TYPES

    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D):
        assert cls in DEFAULT_TARGET_TYPES


def test_gpt2_tied_lm_head_is_excluded(gpt2):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight, "fixture must tie the head"
    targets = resolve_targets(gpt2, cfg())
    assert "transformer.wte.weight" not in targets and "lm_head.weight" not in targets
    assert all(isinstance(dict(gpt2.named_modules())[module_name_of(n)], Conv1D) for n in targets)


def test_untied_head_is_targeted():
    model = MODEL_BUILDERS["gpt2"]()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    assert "lm_head.weight" in resolve_targets(model, cfg())


def test_plain_torch_module_works():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    assert list(resolve_targets(mlp, cfg())) == ["0.weight", "2.weight"]


# ---- explicit targets: regex full match, list exact / suffix ----------------------------------------------------


def test_regex_is_a_full_match(bert):
    targets = resolve_targets(bert, cfg(target_modules=r".*\.query"))
    assert list(targets) == [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
    targets = resolve_targets(bert, cfg(target_modules=r"bert\.encoder\.layer\.0\..*(query|key)"))
    assert list(targets) == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.key.weight",
    ]


@pytest.mark.parametrize("partial", ["query", r"layer\.0", "bert.encoder"])
def test_regex_does_not_search(bert, partial):
    with pytest.raises(ValueError, match="target_modules"):
        resolve_targets(bert, cfg(target_modules=partial))


def test_list_matches_exactly_or_by_dotted_suffix(bert):
    names = list(resolve_targets(bert, cfg(target_modules=["query", "self.value", "classifier"])))
    assert names == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.value.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.value.weight",
        "classifier.weight",
    ]
    exact = resolve_targets(bert, cfg(target_modules=["bert.encoder.layer.1.output.dense"]))
    assert list(exact) == ["bert.encoder.layer.1.output.dense.weight"]


def test_list_suffix_needs_a_dot_boundary(bert):
    with pytest.raises(ValueError, match="target_modules"):
        resolve_targets(bert, cfg(target_modules=["uery"]))


def test_norms_and_embeddings_only_when_named(bert):
    names = list(resolve_targets(bert, cfg(target_modules=["LayerNorm", "word_embeddings"])))
    assert "bert.embeddings.word_embeddings.weight" in names
    assert "bert.embeddings.LayerNorm.weight" in names
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in names
    assert not any(n.endswith(".bias") for n in names), "biases are never pruned"


def test_naming_the_tied_head_is_explicit(gpt2):
    # Explicitly named, the shared tensor is targeted (under the name named_parameters() gives it).
    assert list(resolve_targets(gpt2, cfg(target_modules=["lm_head"]))) == ["transformer.wte.weight"]


def test_exclude_modules(bert, gpt2, cnn):
    names = resolve_targets(bert, cfg(exclude_modules=["classifier", "pooler.dense"]))
    assert "classifier.weight" not in names and "bert.pooler.dense.weight" not in names
    assert len(names) == len(EXPECTED_DEFAULT_TARGETS["bert"]) - 2
    names = resolve_targets(gpt2, cfg(exclude_modules=r"transformer\.h\.0\..*"))
    assert list(names) == [n for n in EXPECTED_DEFAULT_TARGETS["gpt2"] if not n.startswith("transformer.h.0.")]
    names = resolve_targets(cnn, cfg(exclude_modules=["conv1"]))
    assert list(names) == ["conv2.weight", "classifier.weight"]


def test_exclude_wins_over_target(bert):
    names = resolve_targets(bert, cfg(target_modules=["query", "key"], exclude_modules=["key"]))
    assert all(n.endswith("query.weight") for n in names) and len(names) == 2


def test_excluding_everything_raises(cnn):
    with pytest.raises(ValueError, match="exclude_modules"):
        resolve_targets(cnn, cfg(exclude_modules=["conv1", "conv2", "classifier"]))


# ---- helpers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, spec, expected",
    [
        ("a.b.query", r".*query", True),
        ("a.b.query", "query", False),  # regex must match the whole name
        ("a.b.query", ["query"], True),
        ("a.b.query", ["b.query"], True),
        ("a.b.query", ["uery"], False),
        ("query", ["query"], True),
        ("a.b.query", ["a.b.query"], True),
        ("a.b.query", [], False),
    ],
)
def test_module_matches(name, spec, expected):
    assert module_matches(name, spec) is expected


def test_rate_factor():
    rates = {"classifier": 0.5, r".*\.output\.dense": 0.0}
    assert rate_factor("classifier.weight", rates) == 0.5
    assert rate_factor("bert.encoder.layer.0.output.dense.weight", rates) == 0.0
    assert rate_factor("bert.encoder.layer.0.intermediate.dense.weight", rates) is None
    assert rate_factor("classifier.weight", None) is None
    assert module_name_of("conv1.weight") == "conv1" and module_name_of("weight") == ""


def test_resolution_does_not_touch_the_model(bert):
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    resolve_targets(bert, cfg())
    assert all(torch.equal(before[n], p) for n, p in bert.named_parameters())
