"""Run identity: what determines a lottery run's results, recorded in its folder so that a restart never mixes runs.

A run folder's `run_identity.json` holds the sparsity config (without the number of levels, so that adding levels
extends a run), the training arguments that change training (steps, batch, optimizer, schedule, seed, precision;
not logging, evaluation cadence or paths), the model's class, config and a hash of its initial weights, and a
fingerprint of the training data. A restart reuses finished levels only when the requested run has the same
identity; otherwise it stops before training and names what differs (DESIGN.md principle 8).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import torch
from torch import nn

IDENTITY_NAME = "run_identity.json"

# TrainingArguments fields that change the weights a level ends with.
TRAINING_FIELDS = (
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "optim_args",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
    "label_smoothing_factor",
    "dataloader_drop_last",
)
# Sparsity fields that only say how far a run goes: a run with more levels extends one with fewer.
EXTENT_FIELDS = ("levels", "sparsity")


def run_identity(config: Any, args: Any, model: nn.Module, train_dataset: Any) -> dict[str, Any]:
    """The identity of the run that `config`, `args`, `model` (as it starts) and `train_dataset` would train."""
    sparsity = {k: v for k, v in config.to_dict().items() if k not in EXTENT_FIELDS}
    training = {name: _jsonable(getattr(args, name, None)) for name in TRAINING_FIELDS}
    model_config = getattr(model, "config", None)
    model_part: dict[str, Any] = {"class": type(model).__name__, "init_sha256": initial_weights_digest(model)}
    if model_config is not None and hasattr(model_config, "to_dict"):
        # written by save_pretrained or loading, not by what the model is
        skip = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures")
        model_part["config"] = {k: _jsonable(v) for k, v in sorted(model_config.to_dict().items()) if k not in skip}
    peft = peft_identity(model)
    if peft:  # LoRA scaling, dropout, targets: they change training but not theta_0's weights
        model_part["peft"] = peft
    return {
        "sparsity": _jsonable(sparsity),
        "training": training,
        "model": model_part,
        "data": data_digest(train_dataset),
    }


# PeftConfig fields that say where or with which version a config was written, not what it trains.
PEFT_SKIP = ("base_model_name_or_path", "revision", "peft_version", "inference_mode")


def peft_identity(model: nn.Module) -> dict[str, Any]:
    """The adapter configs of a peft model (sets as sorted lists), or {} for any other model."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    out = {}
    for name, config in configs.items():
        fields = config.to_dict() if hasattr(config, "to_dict") else {}
        out[name] = {
            k: _jsonable(sorted(v, key=str) if isinstance(v, (set, frozenset)) else v)
            for k, v in sorted(fields.items())
            if k not in PEFT_SKIP
        }
    return out


def check_identity(root: str, identity: dict[str, Any], write: bool = True) -> None:
    """Refuse to continue a run in `root` whose recorded identity differs; record it for a new run."""
    path = os.path.join(root, IDENTITY_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            recorded = json.load(fh)
        diffs = _differences(recorded, json.loads(json.dumps(identity, sort_keys=True, default=str)))
        if diffs:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs[:8])
            more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
            raise ValueError(
                f"{root} holds a run with other settings, whose finished levels would be mixed with this one: "
                f"{shown}{more}. Use a new output_dir for these settings, or delete {root} to start over."
            )
        return
    if write and _has_levels(root):
        raise ValueError(
            f"{root} holds levels but no {IDENTITY_NAME} (written before hf_tickets recorded run identities), so "
            "they cannot be checked against these settings: use a new output_dir, or delete the folder to start over."
        )
    if write:
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(identity, fh, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)


INIT_DIGEST_ATTR = "hf_tickets_init_sha256"


def initial_weights_digest(model: nn.Module) -> str:
    """`weights_digest` of the model as it was when a lottery run first looked at it (theta_0), kept on the model.

    A run changes the model's weights (levels, pruning), and its controls are then checked against the same
    theta_0; a plain attribute, so the state_dict does not change."""
    digest = getattr(model, INIT_DIGEST_ATTR, None)
    if digest is None:
        digest = weights_digest(model)
        object.__setattr__(model, INIT_DIGEST_ATTR, digest)
    return digest


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes), in state_dict order."""
    return tensors_digest(model.state_dict().items())


def data_digest(dataset: Any) -> dict[str, Any]:
    """Size and content fingerprint of a training set: `datasets`' own fingerprint, else a hash of its tensors."""
    if dataset is None:
        return {"size": 0}
    out: dict[str, Any] = {"type": type(dataset).__name__}
    try:
        out["size"] = len(dataset)
    except TypeError:
        pass
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is not None:
        out["fingerprint"] = str(fingerprint)
        return out
    tensors = {k: v for k, v in vars(dataset).items() if isinstance(v, torch.Tensor)}
    if tensors:
        out["sha256"] = tensors_digest(sorted(tensors.items()))
    return out


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and bytes of the tensors, in the order given."""
    h = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{flat.dtype}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _has_levels(root: str) -> bool:
    return os.path.isdir(root) and any(n.startswith(("level_", "replicate_")) for n in os.listdir(root))


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
