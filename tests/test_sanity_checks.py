"""The sanity-check controls of Frankle et al. 2021 for masks chosen at initialization (`sanity_check=`):
"shuffle" really permutes each tensor's mask and keeps its count (a shuffle that rebinds a local name and changes
nothing, as in the SynFlow repository, is caught); "invert" keeps the complement ranking (hand-checked on a tiny
net); "reinit" changes the weights, keeps the masks, and is seeded; bad values fail before training; the field
round-trips through sparsity_config.json and recipes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_cnn, make_dataset, training_args
from torch import nn

from hf_tickets import SparsityConfig, TicketTrainer, apply_sparsity, load_masks
from hf_tickets import sanity as sanity_module
from hf_tickets.sanity import REINIT_SEED_OFFSET, fresh_model, reinit_weights_, shuffle_masks

AT_INIT = {
    "magnitude": {},
    "snip": {"score_batches": 2},
    "grasp": {},
    "synflow": {"iterations": 3},
}


def _batches():
    rows = list(make_dataset("cnn", 16))
    batches = [torch.utils.data.default_collate(rows[i : i + 8]) for i in range(0, 16, 8)]
    return lambda: iter(batches)


def _masks(method, sanity_check=None, seed=0, sparsity=0.8, model=None, **extra):
    model = make_cnn() if model is None else model
    cfg = SparsityConfig(
        method=method, sparsity=sparsity, sanity_check=sanity_check, seed=seed, **{**AT_INIT[method], **extra}
    )
    return apply_sparsity(model, cfg, batches=_batches()), model


def assert_really_shuffled(before, after):
    """Every tensor keeps its count, and every tensor that is neither empty nor full has changed."""
    assert set(before) == set(after)
    for name in before:
        assert int(after[name].sum()) == int(before[name].sum()), f"{name}: count changed"
        if 0 < int(before[name].sum()) < before[name].numel():
            assert not torch.equal(after[name].cpu(), before[name].cpu()), f"{name}: mask not shuffled"


# ---- shuffle ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(AT_INIT))
def test_shuffle_changes_each_mask_and_keeps_per_layer_counts(method):
    plain, _ = _masks(method)
    shuffled, model = _masks(method, "shuffle")
    assert_really_shuffled(plain, shuffled)
    assert shuffled.sparsity() == pytest.approx(plain.sparsity())
    assert shuffled.metadata["sanity_check"] == "shuffle"
    # the shuffled masks are the ones enforced on the model
    params = dict(model.named_parameters())
    for name, mask in shuffled.items():
        assert not bool(params[name].detach()[~mask].any())


def test_shuffle_is_seeded():
    a, _ = _masks("magnitude", "shuffle", seed=1)
    b, _ = _masks("magnitude", "shuffle", seed=1)
    c, _ = _masks("magnitude", "shuffle", seed=2)
    assert a == b and a != c


def _reference_repo_shuffle(masks, seed):
    """The SynFlow repository's layer-wise shuffle: it rebinds the loop's local name, so nothing is shuffled."""
    torch.manual_seed(seed)
    for mask in masks.values():
        perm = torch.randperm(mask.numel())
        mask = mask.reshape(-1)[perm].reshape(mask.shape)  # noqa: F841,PLW2901  (the bug, on purpose)
    return dict(masks)


def test_a_shuffle_that_shuffles_nothing_is_caught(monkeypatch):
    plain, _ = _masks("magnitude")
    with pytest.raises(AssertionError, match="not shuffled"):
        assert_really_shuffled(plain, _reference_repo_shuffle(dict(plain), 0))
    # and through the real path: with the buggy shuffle in place, the end-to-end check fails
    monkeypatch.setattr(sanity_module, "shuffle_masks", _reference_repo_shuffle)
    buggy, _ = _masks("magnitude", "shuffle")
    with pytest.raises(AssertionError, match="not shuffled"):
        assert_really_shuffled(plain, buggy)


def test_shuffle_masks_returns_new_tensors_and_leaves_its_input():
    masks = {"w": torch.arange(20).reshape(4, 5) % 3 == 0}
    before = masks["w"].clone()
    out = shuffle_masks(masks, 0)
    assert torch.equal(masks["w"], before) and out["w"] is not masks["w"]
    assert int(out["w"].sum()) == int(before.sum()) and not torch.equal(out["w"], before)


# ---- invert -------------------------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    """Linear(3, 2) -> Linear(2, 1) with weights written out by hand (no bias)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[0.9, -0.1, 0.5], [-0.3, 0.7, 0.05]]))
            self.b.weight.copy_(torch.tensor([[-0.6, 0.2]]))


def test_invert_keeps_the_lowest_magnitudes_hand_checked():
    # |w| over both layers: 0.9 .7 .6 .5 .3 .2 .1 .05; at sparsity 0.5 magnitude keeps the top 4, invert the bottom 4
    normal = apply_sparsity(TwoLayer(), SparsityConfig(method="magnitude", sparsity=0.5))
    inverted = apply_sparsity(TwoLayer(), SparsityConfig(method="magnitude", sparsity=0.5, sanity_check="invert"))
    assert normal["a.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert normal["b.weight"].tolist() == [[True, False]]
    assert inverted["a.weight"].tolist() == [[False, True, False], [True, False, True]]
    assert inverted["b.weight"].tolist() == [[False, True]]
    # at 0.75 invert keeps the two smallest: 0.1 and 0.05
    small = apply_sparsity(TwoLayer(), SparsityConfig(method="magnitude", sparsity=0.75, sanity_check="invert"))
    assert small["a.weight"].tolist() == [[False, True, False], [False, False, True]]
    assert not small["b.weight"].any()


@pytest.mark.parametrize("method", sorted(AT_INIT))
def test_invert_keeps_the_complement_ranking(method):
    # at sparsity 0.5 (even count, no ties) the lowest-scoring half is exactly the complement of the highest half
    extra = {"iterations": 1} if method == "synflow" else {}
    normal, _ = _masks(method, sparsity=0.5, **extra)
    inverted, _ = _masks(method, "invert", sparsity=0.5, **extra)
    assert normal.kept() == inverted.kept() == normal.numel() // 2
    for name in normal:
        assert torch.equal(inverted[name], ~normal[name]), name


def test_inverted_iterative_synflow_keeps_the_target_count():
    inverted, _ = _masks("synflow", "invert", sparsity=0.9, iterations=5)
    normal, _ = _masks("synflow", sparsity=0.9, iterations=5)
    assert inverted.kept() == normal.kept() and inverted != normal


# ---- reinit -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(AT_INIT))
def test_reinit_changes_the_weights_and_keeps_the_masks(method):
    original = make_cnn(seed=0)  # the control's seed is 0 too: the fresh init must still differ
    plain, plain_model = _masks(method, model=copy.deepcopy(original))
    masks, model = _masks(method, "reinit", model=copy.deepcopy(original))
    assert masks == plain  # the same masks, chosen on the original weights
    assert [int(m.sum()) for m in masks.values()] == [int(m.sum()) for m in plain.values()]
    fresh = dict(fresh_model(original, REINIT_SEED_OFFSET).named_parameters())
    before = dict(original.named_parameters())
    for name, p in model.named_parameters():
        keep = masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[keep], fresh[name].detach()[keep]), name  # the fresh init, seeded
        assert not bool(p.detach()[~keep].any()), name  # pruned entries are zero
        if name in masks:  # random-initialised weights all differ (BatchNorm's weight is 1 in both)
            assert not bool((p.detach() == before[name].detach())[keep].any()), name
    # the BatchNorm running statistics come from the fresh model too
    assert torch.equal(model.norm.running_var, torch.ones_like(model.norm.running_var))


def test_reinit_is_seeded_and_leaves_the_global_rng():
    state = torch.random.get_rng_state()
    a = _masks("magnitude", "reinit", seed=3)[1]
    assert torch.equal(torch.random.get_rng_state(), state)
    b = _masks("magnitude", "reinit", seed=3)[1]
    c = _masks("magnitude", "reinit", seed=4)[1]
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


def test_reinit_in_the_trainer_trains_the_fresh_weights_under_the_methods_masks(tmp_path):
    original = make_cnn()
    cfg = SparsityConfig(method="snip", sparsity=0.7, sanity_check="reinit")
    trainer = TicketTrainer(
        model=copy.deepcopy(original),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=make_dataset("cnn"),
        sparsity_config=cfg,
    )
    plain = TicketTrainer(
        model=copy.deepcopy(original),
        args=training_args(tmp_path / "plain", max_steps=1),
        train_dataset=make_dataset("cnn"),
        sparsity_config=SparsityConfig(method="snip", sparsity=0.7),
    )
    assert trainer.masks == plain.masks
    assert not torch.equal(trainer.model.conv1.weight, plain.model.conv1.weight)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    assert SparsityConfig.from_pretrained(str(tmp_path / "out")).sanity_check == "reinit"
    assert load_masks(str(tmp_path / "out")).metadata["sanity_check"] == "reinit"


class _Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin.reset_parameters = lambda: (nn.init.ones_(self.lin.weight), nn.init.zeros_(self.lin.bias))
        self.lin.reset_parameters()


def test_reinit_that_replays_the_same_weights_is_an_error():
    with pytest.raises(ValueError, match="drew exactly the model's weights again"):
        reinit_weights_(_Constant(), 0)


# ---- config: validation and round trips ---------------------------------------------------------------------------


def test_bad_values_fail_at_construction_with_clear_errors():
    with pytest.raises(ValueError, match=r"sanity_check='flip' is unknown.*shuffle.*reinit.*invert"):
        SparsityConfig(method="snip", sparsity=0.9, sanity_check="flip")
    for method, extra in [("imp", {"levels": 2}), ("rigl", {}), ("random", {}), ("gradual", {"end_step": 10})]:
        with pytest.raises(ValueError, match=f"not supported by method='{method}'.*'grasp'.*'magnitude'"):
            SparsityConfig(method=method, sparsity=0.5, sanity_check="shuffle", **extra)
    with pytest.raises(ValueError, match="breaks pattern='2:4'"):
        SparsityConfig(method="magnitude", pattern="2:4", sanity_check="shuffle")
    # reinit and invert work with N:M magnitude
    assert SparsityConfig(pattern="2:4", sanity_check="invert").sanity_check == "invert"


def test_round_trip_through_sparsity_config_json(tmp_path):
    for method, extra in AT_INIT.items():
        for check in ("shuffle", "reinit", "invert"):
            cfg = SparsityConfig(method=method, sparsity=0.9, sanity_check=check, max_layer_sparsity=0.99, **extra)
            cfg.save_pretrained(tmp_path / method / check)
            loaded = SparsityConfig.from_pretrained(tmp_path / method / check)
            assert loaded == cfg and type(loaded) is type(cfg)
    # files written before the field existed load with it unset
    assert SparsityConfig.from_dict({"method": "snip", "sparsity": 0.9}).sanity_check is None


def test_the_control_changes_the_run_hash_but_not_old_ones():
    base = SparsityConfig(method="snip", sparsity=0.9)
    hashes = {SparsityConfig(method="snip", sparsity=0.9, sanity_check=c).hashname() for c in ("shuffle", "reinit")}
    assert base.hashname() not in hashes and len(hashes) == 2
    assert SparsityConfig(sparsity=0.9).hashname() == "59d899a8a2"  # pinned in test_config: unchanged


def test_hf_argument_parser_reads_the_control():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser((SparsityConfig,)).parse_args_into_dataclasses(
        ["--method", "magnitude", "--sparsity", "0.9", "--sanity_check", "invert", "--max_layer_sparsity", "0.99"],
        look_for_args_file=False,
    )
    assert cfg.sanity_check == "invert" and cfg.max_layer_sparsity == 0.99


def test_the_model_card_says_it_is_a_control_and_shows_the_cap():
    from hf_tickets.cards import render_sparsity_section

    model = make_cnn()
    cfg = SparsityConfig(method="magnitude", sparsity=0.5, sanity_check="shuffle", max_layer_sparsity=0.9)
    card = render_sparsity_section(apply_sparsity(model, cfg), cfg, model)
    assert "| sanity-check control | `shuffle`" in card and "| max layer sparsity (cap) | 0.9 |" in card
    plain = SparsityConfig(sparsity=0.5)
    assert "sanity-check" not in render_sparsity_section(apply_sparsity(make_cnn(), plain), plain, make_cnn())
