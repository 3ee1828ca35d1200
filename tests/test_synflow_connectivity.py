"""SynFlow avoids layer collapse (Tanaka et al. 2020): on LeNet-300-100 at 99.9% sparsity (266 of 266,200 weights
kept) its masks still connect the input to every output class, while one-shot global magnitude pruning at init
leaves the first layer (nearly) empty and reaches at most one class."""

from __future__ import annotations

import torch

from hf_tickets import SparsityConfig, apply_sparsity
from hf_tickets.models import LeNet300100Config, LeNet300100ForImageClassification


def _lenet(seed: int = 0) -> LeNet300100ForImageClassification:
    torch.manual_seed(seed)
    return LeNet300100ForImageClassification(LeNet300100Config(num_labels=10))


def _outputs_reached(masks) -> int:
    """Output units with at least one path from the input, through the 0/1 masks of the Linear chain."""
    paths = torch.ones(masks["hidden.0.weight"].shape[1], dtype=torch.float64)
    for name in ("hidden.0.weight", "hidden.1.weight", "classifier.weight"):
        paths = masks[name].to(torch.float64) @ paths
    return int((paths > 0).sum())


def test_synflow_keeps_every_class_connected_where_magnitude_does_not():
    synflow = apply_sparsity(_lenet(), SparsityConfig(method="synflow", sparsity=0.999))
    magnitude = apply_sparsity(_lenet(), SparsityConfig(method="magnitude", sparsity=0.999))
    assert synflow.kept() == magnitude.kept() == 266
    assert all(int(m.sum()) > 0 for m in synflow.values())
    assert _outputs_reached(synflow) == 10
    assert int(magnitude["hidden.0.weight"].sum()) <= 3  # Glorot init: the wide first layer has the smallest |w|
    assert _outputs_reached(magnitude) <= 1
