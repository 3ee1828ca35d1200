"""`max_layer_sparsity`: on a model built to collapse (one layer with tiny weights under global magnitude) the
collapse guard fires without the cap; with it no targeted tensor is sparser than the cap and the overall sparsity
is still exact, for one-shot methods, pruning at init, IMP's levels, gradual pruning and the DST allocation
(RigL/SET/static); a target the cap makes impossible fails before training."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import make_cnn, make_dataset, training_args

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity
from hf_tickets.allocation import counts_from_densities, layer_densities, masks_from_scores, min_kept
from hf_tickets.methods import get_method
from hf_tickets.targets import resolve_targets


def collapsing_cnn():
    """TinyCNN with conv2's weights scaled by 1e-3: global magnitude pruning removes all of conv2 first."""
    model = make_cnn()
    with torch.no_grad():
        model.conv2.weight.mul_(1e-3)
    return model


def _batches():
    rows = list(make_dataset("cnn", 8))
    batch = torch.utils.data.default_collate(rows)
    return lambda: iter([batch])


def _exact_kept(masks, sparsity):
    return masks.numel() - int(round(sparsity * masks.numel()))


def test_without_the_cap_the_guard_fires_and_with_it_the_layer_survives(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        TicketTrainer(
            model=collapsing_cnn(),
            args=training_args(tmp_path / "a"),
            train_dataset=make_dataset("cnn"),
            sparsity_config=SparsityConfig(sparsity=0.9),
        )
    assert "Layer collapse" in caplog.text and "conv2.weight" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        trainer = TicketTrainer(
            model=collapsing_cnn(),
            args=training_args(tmp_path / "b"),
            train_dataset=make_dataset("cnn"),
            sparsity_config=SparsityConfig(sparsity=0.9, max_layer_sparsity=0.95),
        )
    masks = trainer.masks
    assert masks.kept() == _exact_kept(masks, 0.9)
    assert max(masks.layer_sparsity().values()) <= 0.95
    assert int(masks["conv2.weight"].sum()) == min_kept(576, 0.95) == 29  # at the cap exactly: the rest went elsewhere
    assert "Layer collapse" not in caplog.text


def test_capped_masks_are_the_capped_layers_best_and_a_global_threshold_elsewhere():
    model = collapsing_cnn()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.9, max_layer_sparsity=0.95))
    w2 = model.conv2.weight.detach().abs()
    # conv2 keeps its 29 largest |w|
    assert torch.equal(masks["conv2.weight"], w2 >= w2.flatten().topk(29).values.min())
    # the others share one threshold: every kept weight outranks every pruned one
    params = dict(make_cnn().named_parameters())
    kept = torch.cat([params[n].detach().abs()[masks[n]] for n in ("conv1.weight", "classifier.weight")])
    pruned = torch.cat([params[n].detach().abs()[~masks[n]] for n in ("conv1.weight", "classifier.weight")])
    assert kept.min() > pruned.max()


def test_a_cap_that_does_not_bind_changes_nothing():
    a = apply_sparsity(make_cnn(), SparsityConfig(sparsity=0.6))
    b = apply_sparsity(make_cnn(), SparsityConfig(sparsity=0.6, max_layer_sparsity=0.99))
    assert a == b


@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "synflow"])
def test_every_one_shot_method_meets_the_cap_and_the_exact_target(method):
    extra = {"iterations": 4} if method == "synflow" else {}
    cfg = SparsityConfig(method=method, sparsity=0.97, max_layer_sparsity=0.975, **extra)
    masks = apply_sparsity(collapsing_cnn(), cfg, batches=_batches())
    assert masks.kept() == _exact_kept(masks, 0.97)
    assert max(masks.layer_sparsity().values()) <= 0.975
    assert masks.collapsed() == {} or all("output units" in why for why in masks.collapsed().values())


def test_imp_levels_keep_the_cap_and_their_exact_rate():
    cfg = SparsityConfig(method="imp", levels=8, prune_fraction=0.3, max_layer_sparsity=0.98)
    model = collapsing_cnn()
    method = get_method("imp")(cfg)
    masks = method.initial_masks(model, resolve_targets(model, cfg), None)
    uncapped = masks
    for level in range(1, 9):
        new = method.next_level_masks(model, masks, level)
        assert new.is_subset_of(masks)
        assert new.kept() == masks.kept() - int(round(0.3 * masks.kept()))  # the per-level rate, exact
        assert max(new.layer_sparsity().values()) <= 0.98
        masks = new
        uncapped = get_method("imp")(SparsityConfig(method="imp", levels=8, prune_fraction=0.3)).next_level_masks(
            model, uncapped, level
        )
    assert uncapped.layer_sparsity()["conv2.weight"] == 1.0  # what the cap prevented
    assert masks.layer_sparsity()["conv2.weight"] == pytest.approx(1 - min_kept(576, 0.98) / 576)


def test_gradual_pruning_keeps_the_cap():
    cfg = SparsityConfig(method="gradual", sparsity=0.9, end_step=4, update_interval=1, max_layer_sparsity=0.95)
    model = collapsing_cnn()
    method = get_method("gradual")(cfg)
    masks = method.initial_masks(model, resolve_targets(model, cfg), None)
    for step in range(1, 5):
        masks = method.after_optimizer_step(model, masks, step) or masks
    assert masks.kept() == _exact_kept(masks, 0.9) and max(masks.layer_sparsity().values()) <= 0.95


# ---- the DST allocation: a floor on each layer's density -----------------------------------------------------------

SHAPES = {"small": (10, 20), "mid": (100, 200), "big": (300, 1000)}


def test_erk_with_a_cap_floors_the_big_layer_and_keeps_the_budget():
    free = layer_densities(SHAPES, 0.02, "erk")
    assert 1 - free["big"] > 0.982  # ERK makes the big layer sparsest
    capped = layer_densities(SHAPES, 0.02, "erk", max_layer_sparsity=0.982)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    counts = counts_from_densities(SHAPES, capped)
    assert sum(counts.values()) == round(0.02 * sum(numel.values()))
    assert all(1 - counts[n] / numel[n] <= 0.982 for n in SHAPES)
    assert counts["big"] == min_kept(numel["big"], 0.982)
    # the other layers keep ERK's proportions among themselves
    assert capped["small"] / capped["mid"] == pytest.approx(free["small"] / free["mid"])


def test_erk_with_a_cap_equals_erk_when_the_cap_does_not_bind():
    free = layer_densities(SHAPES, 0.2, "erk")
    capped = layer_densities(SHAPES, 0.2, "erk", max_layer_sparsity=0.999)
    assert capped == pytest.approx(free)


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_static_and_rigl_masks_meet_the_cap(method):
    cfg = SparsityConfig(method=method, sparsity=0.95, distribution="erk", max_layer_sparsity=0.96)
    masks = apply_sparsity(make_cnn(), cfg)
    assert masks.kept() == _exact_kept(masks, 0.95)
    assert max(masks.layer_sparsity().values()) <= 0.96


# ---- impossible targets fail before training -----------------------------------------------------------------------


def test_impossible_targets_are_clear_errors_before_training():
    with pytest.raises(ValueError, match="sparsity=0.9 cannot be met with max_layer_sparsity=0.8"):
        SparsityConfig(sparsity=0.9, max_layer_sparsity=0.8)
    with pytest.raises(ValueError, match="max_layer_sparsity=1.5 is outside"):
        SparsityConfig(sparsity=0.9, max_layer_sparsity=1.5)
    with pytest.raises(ValueError, match=r"layer_rates\['classifier'\]=1.5 prunes its layers to 0.9"):
        SparsityConfig(sparsity=0.6, layer_rates={"classifier": 1.5}, max_layer_sparsity=0.8)
    with pytest.raises(ValueError, match="after 10 levels"):
        SparsityConfig(method="imp", levels=10, max_layer_sparsity=0.8)
    with pytest.raises(ValueError, match="sparsity=0.5 cannot be met"):
        SparsityConfig(pattern="2:4", max_layer_sparsity=0.4)
    with pytest.raises(ValueError, match="cannot be met with max_layer_sparsity=0.9 and dense_layers"):
        apply_sparsity(
            make_cnn(),
            SparsityConfig(method="static", sparsity=0.9, max_layer_sparsity=0.9, dense_layers=["classifier.weight"]),
        )


def test_a_pool_whose_target_the_cap_cannot_meet_raises():
    scores = {"a": torch.rand(3, 5), "b": torch.rand(3, 5)}  # 15 each; cap 0.9 forces 2 each, target keeps 3
    with pytest.raises(ValueError, match="must keep 4 weights under the cap, but the target keeps 3"):
        masks_from_scores(scores, 0.9, max_layer_sparsity=0.9)
    # one tensor at exactly the cap only differs by rounding: allowed
    out = masks_from_scores({"a": torch.rand(3, 5)}, 0.9, max_layer_sparsity=0.9)
    assert int(out["a"].sum()) == 15 - round(0.9 * 15)


def test_masks_record_the_cap():
    masks = apply_sparsity(make_cnn(), SparsityConfig(sparsity=0.5, max_layer_sparsity=0.9))
    assert isinstance(masks, MaskSet) and masks.metadata["max_layer_sparsity"] == 0.9
