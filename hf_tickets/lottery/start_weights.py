"""Start weights drawn for a lottery run: the reinit control's random initialisation, and theta_0 of replicates r > 0.

A replicate repeats the experiment under another seed. For a network trained from scratch that means a new random
initialisation of the whole network. For a model fine-tuned from a pretrained checkpoint (BERT rewound to its
pretrained weights, Chen et al. 2020) it means what a fine-tuning seed means to a transformers user,
`set_seed(s); AutoModel...from_pretrained(...)`: the checkpoint's weights, with only what the checkpoint does not
hold (a new classification head) drawn under the seed. Re-drawing a pretrained body would silently turn a
fine-tuning replicate into training from scratch.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional

import torch
from safetensors.torch import save_model

logger = logging.getLogger(__name__)


def fresh_init_weights(model: torch.nn.Module, seed: int, path: str) -> str:
    """Write a new random initialisation of `model`'s architecture (its own init scheme) to `path`, once."""
    if os.path.isfile(path):
        return path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = getattr(model, "config", None)
        if config is not None and hasattr(type(model), "config_class"):
            fresh = type(model)(config)
        else:
            fresh = copy.deepcopy(model).cpu()
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    _save(fresh, path)
    return path


def replicate_init_weights(model: torch.nn.Module, seed: int, path: str) -> str:
    """Write theta_0 of a replicate to `path`, once: `model` reloaded from its pretrained checkpoint under `seed`
    when `model` holds that checkpoint's weights, else a fresh initialisation of its whole architecture."""
    if os.path.isfile(path):
        return path
    reloaded = _reload_pretrained(model, seed)
    if reloaded is None:
        return fresh_init_weights(model, seed, path)
    _save(reloaded, path)
    return path


def _reload_pretrained(model: torch.nn.Module, seed: int) -> Optional[torch.nn.Module]:
    """`model`'s checkpoint loaded again with the weights it lacks drawn under `seed`; None for a model that was not
    loaded from a checkpoint, or whose weights no longer are the checkpoint's (then the whole model is re-drawn)."""
    source = getattr(model, "name_or_path", "") or ""
    if not source or not hasattr(type(model), "from_pretrained"):
        return None
    dtype = next(model.parameters()).dtype
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reloaded, info = type(model).from_pretrained(
                source, config=model.config, dtype=dtype, output_loading_info=True
            )
    except (OSError, ValueError) as err:
        logger.warning(
            "replicates: %s names %r as its checkpoint, but it cannot be loaded (%s); each replicate draws a fresh "
            "initialisation of the whole model instead.",
            type(model).__name__,
            source,
            err,
        )
        return None
    drawn = set(info.get("missing_keys", ()))
    ours, theirs = model.state_dict(), reloaded.state_dict()
    loaded = [name for name in theirs if name not in drawn]
    if set(ours) != set(theirs) or not all(torch.equal(ours[n].cpu(), theirs[n]) for n in loaded):
        logger.warning(
            "replicates: %s's weights differ from its checkpoint %r, so each replicate draws a fresh initialisation "
            "of the whole model; to repeat a fine-tuning from that checkpoint, pass the model as loaded.",
            type(model).__name__,
            source,
        )
        return None
    logger.info(
        "replicates: theta_0 is %r's weights; drawn under the replicate's seed: %s",
        source,
        ", ".join(sorted(drawn)) or "nothing (the checkpoint holds every weight)",
    )
    return reloaded


def _save(model: torch.nn.Module, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_model(model, path + ".tmp")
    os.replace(path + ".tmp", path)
