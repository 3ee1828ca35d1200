"""One network of a lottery level: what the runner plans and a backend trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..distributed import model_is_sharded
from ..masks import MaskSet
from .identity import tensors_digest, weights_digest


@dataclass
class Arm:
    """A network to train for one level: the trunk, a control or a replicate's, with where it starts.

    Attributes:
        kind: "trunk", "reinit" or "random_prune".
        replicate: which replicate (own theta_0 and data order).
        level: the IMP level.
        folder: the level folder it is published to.
        masks: its masks (metadata: level, control).
        weights_file: weights it starts from (theta_0, reinit weights), loaded after `rewind_point` if both.
        base_weights: peft model: theta_0's file, loaded first. Its folders (rewind point, levels, checkpoints) hold
            adapters and modules_to_save only, so the frozen base comes from here, and the arm's masks prune it.
        rewind_point: the rewind point (step k of level 0) it resumes from, or None to start at step 0.
        capture_rewind_point: level 0 of a late-rewound trunk: write the rewind point here at step `capture_step`.
        seed: the seed of its data order and dropout (the run's seed plus the replicate).
        args_overrides: TrainingArguments changed for this arm only (Trainer backend: fine-tuning at a constant LR).
        extra_metrics: written into its metrics.json (what it is, where its masks came from, how it was produced).
    """

    kind: str
    replicate: int
    level: int
    folder: str
    masks: MaskSet
    weights_file: Optional[str] = None
    base_weights: Optional[str] = None
    rewind_point: Optional[str] = None
    capture_rewind_point: Optional[str] = None
    capture_step: int = 0
    seed: int = 0
    args_overrides: dict = field(default_factory=dict)
    extra_metrics: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.replicate}] level {self.level}"

    def start_sources(self) -> list[str]:
        """Files and folders the arm's start weights are loaded from, in order (a later one wins)."""
        sources: list[str] = []
        for path in (self.base_weights, self.rewind_point, self.weights_file):
            if path is not None and path not in sources:  # a peft arm rewound to theta_0 names it twice
                sources.append(path)
        return sources


def load_into_(model: nn.Module, path: str) -> None:
    """Load saved weights into `model` in place: a weights file or folder by name (`load_saved_weights`), a peft
    model's adapter folder through peft's loader (no copy of the model)."""
    from ..checkpoints import load_saved_weights
    from ..peft_interop import is_adapter_folder, is_peft_model, load_adapter_folder_
    from ..sharded import load_sharded_, weights_file
    from .lockstep import load_weights_

    if is_adapter_folder(path) and is_peft_model(model):
        load_adapter_folder_(model, path)
        return
    if model_is_sharded(model):  # FSDP2: each rank reads its own rows of the file
        load_sharded_(model, weights_file(path))
        return
    device = next(model.parameters()).device
    load_weights_(model, {k: v.to(device) for k, v in load_saved_weights(path, model).items()})


def start_digest(model: nn.Module) -> str:
    """Hash of the masked weights an arm starts from: equal for both backends when they start alike. Of an FSDP2
    model: `sharded.live_digest` (the ranks' digests of their rows; no weight leaves its rank)."""
    if model_is_sharded(model):
        from ..sharded import live_digest

        return live_digest(model)
    return weights_digest(model)


def masked_copy_digest(template: nn.Module, weights: dict, masks: dict) -> str:
    """`start_digest` of `template` loaded with `weights` and pruned by `masks`, computed without building it.

    Names missing from `weights` (the second name of a tied tensor, which safetensors drops) take the value of the
    name they share storage with; names no weight covers keep the template's value (non-saved buffers)."""
    state = template.state_dict(keep_vars=True)
    loaded_ids = {id(tensor): name for name, tensor in state.items() if name in weights}
    items = []
    for name, tensor in state.items():
        value = weights.get(name)
        if value is None:
            alias = loaded_ids.get(id(tensor))
            value = weights[alias] if alias is not None else tensor.detach()
        mask = masks.get(name)
        if mask is not None:
            value = value.masked_fill(~mask.to(device=value.device, dtype=torch.bool), 0)
        items.append((name, value.to(tensor.dtype)))
    return tensors_digest(items)
