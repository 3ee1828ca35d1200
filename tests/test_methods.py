"""One-shot methods ("magnitude", "random"), layer_rates, N:M masks, allocation and the method registry."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_BUILDERS, make_bert, make_cnn, make_gpt2
from torch import nn

from hf_tickets import MaskSet, SparsityConfig, apply_sparsity
from hf_tickets.allocation import masks_from_scores, nm_masks
from hf_tickets.methods import available_methods, get_method, register_method
from hf_tickets.methods.base import SparsityMethod
from hf_tickets.targets import resolve_targets

SPARSITIES = [0.0, 0.3, 0.5, 0.9, 0.99]


def _weights(model, masks):
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in masks}


# ---- magnitude ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "cnn"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_global_gives_the_exact_fraction(kind, sparsity):
    model = MODEL_BUILDERS[kind]()
    masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=sparsity))
    total = masks.numel()
    assert total - masks.kept() == round(sparsity * total)
    assert list(masks) == list(resolve_targets(model, SparsityConfig(sparsity=0.5)))


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_layerwise_gives_the_exact_fraction_per_layer(sparsity):
    model = make_bert()
    masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=sparsity, scope="layerwise"))
    for name, m in masks.items():
        assert m.numel() - int(m.sum()) == round(sparsity * m.numel()), name


def test_magnitude_global_keeps_the_largest_weights():
    model = make_bert()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.8))
    kept = torch.cat([dense[n][m].abs() for n, m in masks.items()])
    pruned = torch.cat([dense[n][~m].abs() for n, m in masks.items()])
    assert kept.min() >= pruned.max()
    # and the layers really are pruned at different rates (one global threshold)
    rates = {round(v, 3) for v in masks.layer_sparsity().values()}
    assert len(rates) > 1


def test_magnitude_layerwise_keeps_the_largest_weights_of_each_layer():
    model = make_cnn()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.5, scope="layerwise"))
    for name, m in masks.items():
        assert dense[name][m].abs().min() >= dense[name][~m].abs().max(), name


def test_apply_sparsity_zeroes_pruned_weights_and_keeps_the_rest():
    model = make_bert()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.6))
    assert isinstance(masks, MaskSet)
    assert model.hf_tickets_masks is masks
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.all(p[~masks[name]] == 0)
            assert torch.equal(p[masks[name]], dense[name][masks[name]])
        else:
            assert torch.equal(p, dense[name]), f"{name} is not targeted and must not change"


def test_compute_masks_is_pure():
    model = make_bert()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SparsityConfig(sparsity=0.6)
    masks = get_method("magnitude")(cfg).initial_masks(model, resolve_targets(model, cfg), None)
    assert masks.sparsity() == pytest.approx(0.6, abs=1e-4)
    assert all(torch.equal(dense[n], p) for n, p in model.named_parameters())


def test_masks_metadata():
    masks = apply_sparsity(make_cnn(), SparsityConfig(method="random", sparsity=0.4, seed=9, scope="layerwise"))
    assert masks.metadata == {"method": "random", "pattern": "unstructured", "scope": "layerwise", "seed": 9}


# ---- random -------------------------------------------------------------------------------------------------------


def test_random_same_seed_same_masks_different_seed_different():
    cfg = SparsityConfig(method="random", sparsity=0.7, seed=3)
    a = apply_sparsity(make_bert(seed=0), cfg)
    b = apply_sparsity(make_bert(seed=1), cfg)  # other weights: random masks do not depend on them
    c = apply_sparsity(make_bert(seed=0), SparsityConfig(method="random", sparsity=0.7, seed=4))
    assert a == b
    assert a != c
    assert all(not torch.equal(a[n], c[n]) for n in a), "every layer should differ"


def test_random_is_not_magnitude():
    model = make_bert()
    r = apply_sparsity(make_bert(), SparsityConfig(method="random", sparsity=0.7))
    m = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.7))
    assert r != m


def test_random_does_not_touch_the_global_rng():
    model = make_cnn()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apply_sparsity(model, SparsityConfig(method="random", sparsity=0.5, seed=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.95])
def test_random_layerwise_gives_exact_per_layer_counts(sparsity):
    masks = apply_sparsity(make_bert(), SparsityConfig(method="random", sparsity=sparsity, scope="layerwise"))
    for name, m in masks.items():
        assert m.numel() - int(m.sum()) == round(sparsity * m.numel()), name


def test_random_global_gives_the_exact_total():
    masks = apply_sparsity(make_gpt2(), SparsityConfig(method="random", sparsity=0.77))
    assert masks.numel() - masks.kept() == round(0.77 * masks.numel())


# ---- layer_rates --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_layer_rates_prune_the_classifier_at_half_rate(scope, method):
    cfg = SparsityConfig(method=method, sparsity=0.8, scope=scope, layer_rates={"classifier": 0.5})
    masks = apply_sparsity(make_bert(), cfg)
    head = masks["classifier.weight"]
    assert head.numel() - int(head.sum()) == round(0.4 * head.numel())
    rest = {n: m for n, m in masks.items() if n != "classifier.weight"}
    if scope == "global":
        pruned = sum(m.numel() - int(m.sum()) for m in rest.values())
        assert pruned == round(0.8 * sum(m.numel() for m in rest.values())), "the other layers keep the base rate"
    else:
        for name, m in rest.items():
            assert m.numel() - int(m.sum()) == round(0.8 * m.numel()), name


def test_layer_rates_json_string_and_regex_keys():
    cfg = SparsityConfig(
        sparsity=0.6,
        layer_rates='{"bert\\\\.encoder\\\\.layer\\\\.\\\\d+\\\\.output\\\\.dense": 0.0, "classifier": 0.5}',
    )
    masks = apply_sparsity(make_bert(), cfg)
    for i in range(2):
        assert bool(masks[f"bert.encoder.layer.{i}.output.dense.weight"].all()), "factor 0 leaves the layer dense"
        assert not bool(masks[f"bert.encoder.layer.{i}.attention.output.dense.weight"].all())
    head = masks["classifier.weight"]
    assert head.numel() - int(head.sum()) == round(0.3 * head.numel())


# ---- N:M ----------------------------------------------------------------------------------------------------------


def _assert_n_of_m_along_dim(mask: torch.Tensor, n: int, m: int, dim: int):
    groups = mask.movedim(dim, -1)
    groups = groups.reshape(*groups.shape[:-1], groups.shape[-1] // m, m)
    assert torch.all(groups.sum(-1) == n)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_2_4_on_linear_groups_input_features(method):
    model = make_bert()
    masks = apply_sparsity(model, SparsityConfig(method=method, pattern="2:4"))
    for m in masks.values():
        _assert_n_of_m_along_dim(m, 2, 4, dim=1)  # Linear weight is [out, in]
    assert masks.sparsity() == pytest.approx(0.5)


def test_2_4_on_conv2d_groups_input_channels():
    model = make_cnn(num_channels=4)
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    for name in ("conv1.weight", "conv2.weight"):
        m = masks[name]
        assert m.dim() == 4
        _assert_n_of_m_along_dim(m, 2, 4, dim=1)  # [out, in, kh, kw]: groups of in-channels per (out, kh, kw)
    _assert_n_of_m_along_dim(masks["classifier.weight"], 2, 4, dim=1)


def test_2_4_magnitude_keeps_the_two_largest_of_each_group():
    model = make_cnn(num_channels=4)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    w = dense["conv2.weight"].abs().movedim(1, -1).reshape(-1, 4)
    m = masks["conv2.weight"].movedim(1, -1).reshape(-1, 4)
    assert torch.all(w.masked_fill(~m, float("inf")).min(-1).values >= w.masked_fill(m, -1.0).max(-1).values)


def test_1_4_and_other_n_m():
    masks = apply_sparsity(make_bert(), SparsityConfig(pattern="1:4"))
    for m in masks.values():
        _assert_n_of_m_along_dim(m, 1, 4, dim=1)
    masks = apply_sparsity(make_bert(), SparsityConfig(pattern="4:8", exclude_modules=["classifier"]))
    for m in masks.values():
        _assert_n_of_m_along_dim(m, 4, 8, dim=1)


def test_2_4_on_gpt2_conv1d_groups_input_features():
    masks = apply_sparsity(make_gpt2(), SparsityConfig(pattern="2:4"))
    for m in masks.values():
        _assert_n_of_m_along_dim(m, 2, 4, dim=0)  # Conv1D weight is [in, out]


def test_nm_masks_unit():
    scores = {"w": torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, 5.0, 0.5, 6.0]])}
    assert nm_masks(scores, 2, 4)["w"].tolist() == [[True, True, False, False, False, True, False, True]]


# ---- allocation ---------------------------------------------------------------------------------------------------


def test_masks_from_scores_with_current_masks_only_shrink():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 10, generator=g), "b": torch.rand(30, generator=g)}
    level1 = masks_from_scores(scores, 0.5)
    level2 = masks_from_scores(scores, 0.2, current=level1, relative=True)
    m1, m2 = MaskSet(level1), MaskSet(level2)
    assert m2.is_subset_of(m1)
    assert m1.kept() == 65 and m2.kept() == 65 - round(0.2 * 65)
    # with random scores the rest of the pruned entries also stay pruned
    rescored = {n: torch.rand(s.shape, generator=g) for n, s in scores.items()}
    m3 = MaskSet(masks_from_scores(rescored, 0.8, current=level2))
    assert m3.is_subset_of(m2) and m3.kept() == 130 - round(0.8 * 130)


def test_masks_from_scores_ties_still_give_exact_counts():
    scores = {"a": torch.zeros(7, 3), "b": torch.ones(5)}
    masks = MaskSet(masks_from_scores(scores, 0.5))
    assert masks.numel() - masks.kept() == round(0.5 * 26)


# ---- registry -----------------------------------------------------------------------------------------------------


def test_registry():
    assert {"magnitude", "random"} <= set(available_methods())
    assert get_method("magnitude").name == "magnitude"

    class Other(SparsityMethod):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("magnitude", SparsityConfig, Other)
    with pytest.raises(ValueError, match="method"):
        get_method("nope")


def test_plain_torch_module_can_be_sparsified():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    masks = apply_sparsity(mlp, SparsityConfig(sparsity=0.75))
    assert masks.numel() - masks.kept() == round(0.75 * 240)
