"""The sanity-check controls of Frankle, Dziugaite, Roy and Carbin 2021 ("Pruning Neural Networks at
Initialization: Why are We Missing the Mark?", ICLR) for masks chosen once at initialization.

`SparsityConfig.sanity_check` picks one:

- `"shuffle"`: each tensor's mask is permuted at random, so every tensor keeps exactly as many weights as the
  method gave it but not the ones it chose (does the method find *which* weights, or only *how many* per layer?).
- `"reinit"`: the masks are kept and every parameter and buffer is re-initialised from the model's own init scheme
  (a fresh instance of its class, `_init_weights`/`post_init`), seeded (do the weights the method saw matter?).
- `"invert"`: the method keeps its lowest-scoring weights instead of its highest (is the score's order useful?).
  Only the method knows its scores, so it ranks with `oriented(scores, config)`; shuffle and reinit are applied
  here to whatever initial masks a method returns (`hf_tickets.sparsify.initial_masks` calls `apply_sanity_check`).

Every random choice comes from `SparsityConfig.seed` plus an offset (so the control does not replay the draws of
the model's initialisation or of random pruning with the same seed), through CPU generators: all ranks and device
types get the same masks and weights.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from .config import SparsityConfig
from .masks import MaskSet

SHUFFLE_SEED_OFFSET = 7_919  # the shuffle's generator: SparsityConfig.seed + this
REINIT_SEED_OFFSET = 1_000_003  # the fresh init's seed: SparsityConfig.seed + this (as the LTH reinit control)


def oriented(scores: Mapping[str, torch.Tensor], config: SparsityConfig) -> dict[str, torch.Tensor]:
    """`scores` as the allocation should rank them (highest kept): negated under `sanity_check="invert"`, so the
    lowest-scoring weights are kept with the same per-pool counts."""
    if getattr(config, "sanity_check", None) == "invert":
        return {n: -s for n, s in scores.items()}
    return dict(scores)


def shuffle_masks(masks: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each mask with its entries permuted by a CPU generator seeded with `seed`: per-tensor counts are kept.

    A new tensor is built and returned for every mask (never a rebound local name: the SynFlow repository's
    layer-wise shuffle did `mask = mask.reshape(-1)[perm]...` inside its loop, which changed nothing)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        flat = mask.detach().reshape(-1).cpu()
        perm = torch.randperm(flat.numel(), generator=generator)
        out[name] = flat[perm].view(mask.shape).to(mask.device)
    return out


def fresh_model(model: nn.Module, seed: int) -> nn.Module:
    """A new instance of `model`'s architecture on the CPU, initialised by its own scheme under `seed`.

    A transformers model is rebuilt from its config (its `_init_weights` runs in `post_init`); another module is
    deep-copied and every submodule's `reset_parameters` called. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = getattr(model, "config", None)
        if config is not None and hasattr(type(model), "config_class"):
            return type(model)(copy.deepcopy(config))
        fresh = copy.deepcopy(model).cpu()
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return fresh


def reinit_weights_(model: nn.Module, seed: int) -> None:
    """Copy a fresh initialisation (`fresh_model`) into every parameter and floating-point buffer of `model`, in
    place (same tensors, so optimizers and references stay valid). Raise when nothing changed (the fresh init
    replayed the model's own, e.g. its seed): the control would silently be the unpruned method."""
    fresh = fresh_model(model, seed)
    new = dict(fresh.named_parameters())
    new.update({n: b for n, b in fresh.named_buffers() if b.is_floating_point()})
    changed = False
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name not in new or not tensor.is_floating_point():
                continue
            source = new[name]
            if source.shape != tensor.shape:
                raise ValueError(
                    f"sanity_check='reinit': the fresh {type(model).__name__} has {name} of shape "
                    f"{tuple(source.shape)}, the model {tuple(tensor.shape)}: re-initialisation needs a model that "
                    "its own class can rebuild from its config."
                )
            source = source.to(device=tensor.device, dtype=tensor.dtype)
            changed = changed or not torch.equal(source, tensor)
            tensor.copy_(source)
    if not changed:
        raise ValueError(
            f"sanity_check='reinit' drew exactly the model's weights again (seed {seed}): choose another "
            "SparsityConfig.seed."
        )


def apply_sanity_check(model: nn.Module, masks: MaskSet, config: SparsityConfig) -> MaskSet:
    """Apply `config.sanity_check` to a method's initial `masks` (and, for "reinit", to the model's weights).

    "shuffle" returns permuted masks; "reinit" re-initialises the model in place and returns the masks unchanged;
    "invert" and None return them as they are (the method inverted its scores itself)."""
    check = getattr(config, "sanity_check", None)
    if check is None:
        return masks
    meta = dict(masks.metadata, sanity_check=check)
    if check == "shuffle":
        return MaskSet(shuffle_masks(masks, config.seed + SHUFFLE_SEED_OFFSET), meta)
    if check == "reinit":
        reinit_weights_(model, config.seed + REINIT_SEED_OFFSET)
    return MaskSet(dict(masks), meta)
