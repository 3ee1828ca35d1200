"""Importance scores: one float tensor per targeted parameter, higher = more worth keeping."""

from __future__ import annotations

from typing import Mapping

import torch


def magnitude_scores(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w|: the score of magnitude pruning and IMP."""
    return {name: p.detach().abs().float() for name, p in params.items()}


def random_scores(params: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores from a CPU generator seeded with `seed`.

    The generator lives on the CPU so that every rank and every device type draws the same numbers: the same seed
    gives the same masks under DDP, on CPU and on GPU.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=generator, dtype=torch.float32).to(p.device) for name, p in params.items()
    }
