"""LTH controls run from a finished trunk: same masks on a new random init, or random masks with the same counts.

Each control writes next to the trunk, in `<trunk>.<kind>/level_NN/`, one level at a time (finished levels are
skipped), and its metrics.json names the trunk folder, level and config hash whose masks it used.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import save_model

from ..allocation import random_masks_like
from ..config import SparsityConfig
from ..masks import MaskSet
from .identity import check_identity, run_identity
from .layout import CONTROL_KINDS, control_dir, trunk_levels
from .levels import INIT_WEIGHTS_NAME, REWIND_DIR, LevelStart, is_complete, level_dir, train_level

if TYPE_CHECKING:
    from ..trainer import TicketTrainer

REINIT_SEED_OFFSET = 1_000_003  # the reinit control's seed is the trunk's seed plus this: "another seed"


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_model(fresh, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def run_control(trainer: "TicketTrainer", kind: str, trunk_dir: str, levels: Optional[list[int]] = None) -> str:
    """Train control `kind` for the given trunk levels; see `TicketTrainer.train_control`."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control kind {kind!r} is unknown: choose one of {list(CONTROL_KINDS)}.")
    if not os.path.isdir(trunk_dir):
        raise ValueError(f"trunk_dir={trunk_dir!r} does not exist: run the IMP trunk first.")
    available = trunk_levels(trunk_dir)
    levels = available if levels is None else list(levels)
    missing = [level for level in levels if level not in available]
    if missing:
        raise ValueError(f"trunk {trunk_dir!r} has no finished pruned level {missing}: finished ones are {available}.")
    trunk_config = (
        SparsityConfig.from_pretrained(level_dir(trunk_dir, levels[0])) if levels else trainer.sparsity_config
    )
    if trunk_config.rewind not in ("init", "step"):
        raise ValueError(
            f"controls rewind like the trunk, but the trunk used rewind={trunk_config.rewind!r}: controls are defined "
            "for rewind='init' or 'step'."
        )
    # The control must train exactly as the trunk did (same steps, optimizer, data, theta_0): same identity.
    check_identity(
        trunk_dir, run_identity(trunk_config, trainer.args, trainer.model, trainer.train_dataset), write=False
    )
    out_root = control_dir(trunk_dir, kind)
    reinit_file = None
    if kind == "reinit":
        seed = trunk_config.seed + REINIT_SEED_OFFSET
        reinit_file = os.path.join(out_root, "reinit_weights.safetensors")
        if trainer.args.should_save:
            fresh_init_weights(trainer.model, seed, reinit_file)
        trainer.accelerator.wait_for_everyone()
    for level in levels:
        final = level_dir(out_root, level)
        if is_complete(final):
            continue
        trunk_level = level_dir(trunk_dir, level)
        trunk_masks = MaskSet.load(trunk_level)
        meta = dict(trunk_masks.metadata, control=kind, level=level)
        if kind == "reinit":
            masks = MaskSet({n: m.clone() for n, m in trunk_masks.items()}, meta)
            start = LevelStart(weights_file=reinit_file)
        else:
            masks = MaskSet(random_masks_like(trunk_masks, trunk_config.seed + level), meta)
            start = _trunk_rewind_start(trunk_dir, trunk_config)
        extra = {
            "control": kind,
            "trunk_dir": os.path.abspath(trunk_dir),
            "trunk_level": level,
            "trunk_config_hash": trunk_config.hashname(),
            "trunk_masks": os.path.join(os.path.abspath(trunk_level), "masks.safetensors"),
            "rewind": trunk_config.rewind,
        }
        train_level(trainer, final, masks, start, extra)
    from .report import write_report

    if trainer.args.should_save:
        write_report(trunk_dir)
    return out_root


def _trunk_rewind_start(trunk_dir: str, config: SparsityConfig) -> LevelStart:
    rewind_point = os.path.join(trunk_dir, REWIND_DIR)
    if config.rewind == "step" and os.path.isdir(rewind_point):
        return LevelStart(resume_from=rewind_point)
    return LevelStart(weights_file=os.path.join(trunk_dir, INIT_WEIGHTS_NAME))
