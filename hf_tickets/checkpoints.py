"""Which Trainer checkpoint to resume from, and reading the weights a saved folder holds."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from typing import Optional

import torch
from safetensors.torch import load_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .files import MODEL_CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)


def last_complete_checkpoint(folder: str, at_most: Optional[int] = None) -> Optional[str]:
    """The newest `checkpoint-N` in `folder` (with N <= `at_most`, if given) that Trainer finished writing, or None.

    Trainer writes `trainer_state.json` last and in place, so a process killed while saving leaves a newest folder
    without it (or with a torn one); `transformers.trainer_utils.get_last_checkpoint` would pick that folder and
    resuming would fail. This skips it and resumes from the one before."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)) and (at_most is None or int(match.group(1)) <= at_most):
            steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        path = os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, ValueError):
            logger.warning("Skipping %s: Trainer did not finish writing it (interrupted save)", path)
            continue
        return path
    return None


def load_saved_weights(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights saved at `path` (a folder or its `model.safetensors`), keyed by `model`'s own state_dict names.

    `save_pretrained` (and so every Trainer checkpoint) writes some transformers 5 models under their original
    checkpoint names (ViT: `vit.encoder.layer.0.attention.attention.query.weight` for the live
    `vit.layers.0.attention.q_proj.weight`), and a plain `load_state_dict(strict=False)` then silently loads
    nothing for those tensors; transformers 5.24's own `Trainer._load_from_checkpoint` does exactly that. Such
    folders are read through `from_pretrained`, which maps the names back.

    For a peft model, a folder with `adapter_model.safetensors` and no `model.safetensors` (Trainer's checkpoint of
    a `PeftModel`) gives only the tensors it holds: adapters and `modules_to_save`.
    """
    from .peft_interop import is_adapter_folder, is_peft_model, load_adapter_folder_

    if is_adapter_folder(path) and is_peft_model(model):
        # A peft model's checkpoint holds its adapters (and modules_to_save), not the base: read them with peft's
        # loader into a copy, so that `model` keeps its weights.
        return load_adapter_folder_(copy.deepcopy(model), path)
    folder, file = (path, os.path.join(path, WEIGHTS_NAME)) if os.path.isdir(path) else (os.path.dirname(path), path)
    raw = load_file(file)
    own = set(model.state_dict())
    if set(raw) <= own:
        return raw
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and os.path.isfile(os.path.join(folder, MODEL_CONFIG_NAME)):
        loaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
        return {name: tensor.detach() for name, tensor in loaded.state_dict().items()}
    unknown = sorted(set(raw) - own)
    raise ValueError(f"{file} holds weights {unknown[:3]} that {type(model).__name__} does not have.")


def saved_under_other_names(folder: str, model: torch.nn.Module) -> bool:
    """True when `folder`'s single `model.safetensors` names tensors `model` does not have under those names (a
    transformers 5 model saved under its original checkpoint names, see `load_saved_weights`)."""
    file = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(file):
        return False
    from safetensors import safe_open

    with safe_open(file, framework="pt") as fh:
        names = set(fh.keys())
    return not names <= set(model.state_dict())
