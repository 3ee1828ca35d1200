"""Density allocation for sparse-from-scratch methods (RigL, SET, static sparse): uniform / Erdős–Rényi / ERK
densities hit the overall target, cap at 1, keep named layers dense; integer counts and seeded random masks."""

from __future__ import annotations

import math

import pytest
import torch

from hf_tickets.allocation import DISTRIBUTIONS, counts_from_densities, layer_densities, random_masks_with_counts

LENET_300_100 = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
LENET_5 = {
    "conv1.weight": (6, 1, 5, 5),
    "conv2.weight": (16, 6, 5, 5),
    "fc1.weight": (120, 400),
    "fc2.weight": (84, 120),
    "fc3.weight": (10, 84),
}
# a small first conv next to large layers: ERK densities above 1 at moderate sparsity
CONV_NET = {
    "stem.weight": (16, 3, 3, 3),
    "block.weight": (64, 16, 3, 3),
    "wide.weight": (512, 64, 1, 1),
    "head.weight": (1000, 512),
    "bias_like.weight": (64,),
}
SHAPES = {"lenet300": LENET_300_100, "lenet5": LENET_5, "conv": CONV_NET}
DENSITIES = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0]


def _numel(shapes):
    return {n: math.prod(s) for n, s in shapes.items()}


def _mean(shapes, densities):
    numel = _numel(shapes)
    return sum(densities[n] * numel[n] for n in shapes) / sum(numel.values())


def _raw(shape, distribution):
    if distribution == "uniform":
        return 1.0
    dims = list(shape[:2]) if distribution == "erdos_renyi" else list(shape)
    return sum(dims) / math.prod(dims)


def _check_solution(shapes, densities, density, distribution, dense_layers=()):
    """The unique solution: mean exact; named layers dense; the others at eps * raw, capped at 1 exactly where
    eps * raw >= 1."""
    assert list(densities) == list(shapes)
    assert _mean(shapes, densities) == pytest.approx(density, abs=1e-12)
    assert all(0.0 <= d <= 1.0 for d in densities.values())
    for name in dense_layers:
        assert densities[name] == 1.0
    free = {n: d / _raw(shapes[n], distribution) for n, d in densities.items() if d < 1.0 and n not in dense_layers}
    if free:
        eps = next(iter(free.values()))
        assert all(v == pytest.approx(eps, rel=1e-9) for v in free.values()), free
        for name, d in densities.items():
            if d == 1.0 and name not in dense_layers:
                assert eps * _raw(shapes[name], distribution) >= 1.0 - 1e-9, name


@pytest.mark.parametrize("model", sorted(SHAPES))
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("density", DENSITIES)
def test_weighted_mean_is_the_target(model, distribution, density):
    shapes = SHAPES[model]
    densities = layer_densities(shapes, density, distribution)
    _check_solution(shapes, densities, density, distribution)
    counts = counts_from_densities(shapes, densities)
    assert sum(counts.values()) == round(density * sum(_numel(shapes).values()))


def test_uniform_is_the_same_everywhere():
    densities = layer_densities(LENET_5, 0.1, "uniform")
    assert all(d == pytest.approx(0.1) for d in densities.values())


def test_erdos_renyi_uses_the_first_two_dims_and_erk_the_kernel_too():
    er = layer_densities(LENET_5, 0.1, "erdos_renyi")
    erk = layer_densities(LENET_5, 0.1, "erk")
    # Erdős–Rényi ignores the 5x5 kernels: the convs (tiny n_in * n_out) are capped dense; ERK keeps them sparse
    assert er["conv1.weight"] == er["conv2.weight"] == 1.0
    assert erk["conv2.weight"] < 1.0
    # ERK: density ratio of two free layers is the ratio of sum(shape) / prod(shape)
    ratio = erk["fc3.weight"] / erk["fc1.weight"]
    assert ratio == pytest.approx((94 / 840) / (520 / 48000))


def test_erk_caps_at_one_and_rescales_the_rest():
    density = 0.1
    densities = layer_densities(CONV_NET, density, "erk")
    capped = [n for n, d in densities.items() if d == 1.0]
    assert "stem.weight" in capped and "bias_like.weight" in capped  # their raw ERK density is far above the rest
    assert "head.weight" not in capped
    # without the cap the small layers would be above 1, and the mean would be short of the target after clipping
    numel = _numel(CONV_NET)
    eps0 = density * sum(numel.values()) / sum(_raw(s, "erk") * numel[n] for n, s in CONV_NET.items())
    assert eps0 * _raw(CONV_NET["stem.weight"], "erk") > 1.0
    _check_solution(CONV_NET, densities, density, "erk")


def test_erk_capping_is_iterative():
    """Capping the densest layer raises the others' density; a second layer can then cross 1 too."""
    shapes = {"a": (4, 4), "b": (16, 16), "c": (64, 64), "d": (1024, 1024)}
    for density in (0.02, 0.05, 0.1, 0.3):
        densities = layer_densities(shapes, density, "erk")
        _check_solution(shapes, densities, density, "erk")
    assert [n for n, d in layer_densities(shapes, 0.3, "erk").items() if d == 1.0] == ["a", "b", "c"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_dense_layers_get_density_one_and_the_rest_is_rescaled(distribution):
    densities = layer_densities(LENET_5, 0.1, distribution, dense_layers=["fc3.weight"])
    _check_solution(LENET_5, densities, 0.1, distribution, dense_layers=["fc3.weight"])
    plain = layer_densities(LENET_5, 0.1, distribution)
    assert plain["fc3.weight"] < 1.0
    assert densities["fc1.weight"] < plain["fc1.weight"]  # the dense layer's extra weights come out of the others
    first = layer_densities(LENET_5, 0.1, distribution, dense_layers=["conv1.weight"])  # "first layer dense"
    _check_solution(LENET_5, first, 0.1, distribution, dense_layers=["conv1.weight"])


def test_impossible_targets_raise_naming_the_fix():
    with pytest.raises(ValueError, match=r"SparsityConfig\.sparsity=0\.99 .*at most 0\.219"):
        layer_densities(LENET_5, 0.01, "erk", dense_layers=["fc1.weight"])
    with pytest.raises(ValueError, match=r"SparsityConfig\.distribution='erk2'"):
        layer_densities(LENET_5, 0.1, "erk2")
    with pytest.raises(ValueError, match=r"SparsityConfig\.sparsity"):
        layer_densities(LENET_5, 1.5, "erk")
    with pytest.raises(ValueError, match="not among the sparsified tensors"):
        layer_densities(LENET_5, 0.1, "erk", dense_layers=["conv1"])  # exact names only
    # the dense layers alone exactly at the budget: fine, every other layer empty
    numel = _numel(LENET_300_100)
    exact = numel["fc3.weight"] / sum(numel.values())
    densities = layer_densities(LENET_300_100, exact, "erk", dense_layers=["fc3.weight"])
    assert densities["fc1.weight"] == pytest.approx(0.0, abs=1e-12) and densities["fc3.weight"] == 1.0


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_counts_are_exact_and_close_to_the_densities(distribution):
    numel = _numel(CONV_NET)
    total = sum(numel.values())
    for density in [i / 97 for i in range(98)]:
        densities = layer_densities(CONV_NET, density, distribution)
        counts = counts_from_densities(CONV_NET, densities)
        assert sum(counts.values()) == round(density * total), density
        for name, k in counts.items():
            assert 0 <= k <= numel[name]
            assert abs(k - densities[name] * numel[name]) < 1.0
            if densities[name] == 1.0:
                assert k == numel[name]


def test_counts_largest_remainder_and_explicit_total():
    shapes = {"a": (10,), "b": (10,), "c": (10,)}
    counts = counts_from_densities(shapes, {"a": 0.34, "b": 0.33, "c": 0.33})  # 3.4 + 3.3 + 3.3 = 10
    assert counts == {"a": 4, "b": 3, "c": 3}
    assert counts_from_densities(shapes, {"a": 0.34, "b": 0.33, "c": 0.33}, total=9) == {"a": 3, "b": 3, "c": 3}
    assert counts_from_densities(shapes, {"a": 0.34, "b": 0.36, "c": 0.30}, total=11) == {"a": 4, "b": 4, "c": 3}
    with pytest.raises(ValueError, match="no density"):
        counts_from_densities(shapes, {"a": 0.5})


def test_random_masks_have_exact_counts_and_are_seeded():
    densities = layer_densities(LENET_5, 0.1, "erk")
    counts = counts_from_densities(LENET_5, densities)
    a = random_masks_with_counts(LENET_5, counts, torch.Generator().manual_seed(3))
    b = random_masks_with_counts(LENET_5, counts, torch.Generator().manual_seed(3))
    c = random_masks_with_counts(LENET_5, counts, torch.Generator().manual_seed(4))
    for name, shape in LENET_5.items():
        assert a[name].dtype == torch.bool and a[name].device.type == "cpu"
        assert tuple(a[name].shape) == shape
        assert int(a[name].sum()) == counts[name]
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], c[n]) for n in LENET_5)
    # drawing does not touch the global RNG
    before = torch.random.get_rng_state()
    random_masks_with_counts(LENET_5, counts, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)
    with pytest.raises(ValueError, match="outside"):
        random_masks_with_counts({"x": (2, 2)}, {"x": 5}, torch.Generator())
