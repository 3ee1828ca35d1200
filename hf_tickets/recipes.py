"""Recipes: one YAML file per experiment (model, data, sparsity, training arguments, controls), run end to end.

A recipe has the sections `model`, `data`, `sparsity` (SparsityConfig fields), `training` (TrainingArguments
fields) and optionally `controls` (LTH controls to run after an IMP trunk) and `source` (the paper it follows).
Any value can be overridden from the command line with dotted keys: `training.max_steps=100`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

import numpy as np
import yaml

SECTIONS = ("source", "description", "model", "data", "sparsity", "training", "controls", "ticket")


def load_recipe(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe and apply `section.key=value` overrides (values parsed as YAML: numbers, lists, ...)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} not found: pass a YAML file such as recipes/quickstart_digits.yaml.")
    with open(path, encoding="utf-8") as fh:
        recipe = yaml.safe_load(fh) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path!r} must be a YAML mapping with sections {list(SECTIONS)}.")
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ValueError(f"recipe {path!r} has unknown sections {unknown}: use {list(SECTIONS)}.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. training.max_steps=100.")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ValueError(f"override {item!r} names no recipe section: use one of {list(SECTIONS)}.")
        node = recipe
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    recipe.setdefault("model", {})
    recipe.setdefault("data", {})
    recipe.setdefault("sparsity", {})
    recipe.setdefault("training", {})
    return recipe


def accuracy(eval_pred) -> dict[str, float]:
    """Top-1 accuracy, computed directly (evaluate.load would fetch its script from the Hub)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def build_trainer(recipe: dict[str, Any]):
    """Model, data and TicketTrainer for a recipe (the trainer is not run)."""
    from transformers import TrainingArguments

    from .config import SparsityConfig
    from .data import load_splits
    from .trainer import TicketTrainer

    data_cfg = dict(recipe["data"])
    name = data_cfg.pop("name", None)
    if not name:
        raise ValueError("recipe data.name is required, e.g. data.name=sklearn/digits.")
    splits = load_splits(name, **data_cfg)
    model = _build_model(recipe["model"], splits["train"])
    args = TrainingArguments(**recipe["training"])
    return TicketTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset={"validation": splits["validation"], "test": splits["test"]},
        compute_metrics=accuracy,
        sparsity_config=SparsityConfig(**recipe["sparsity"]),
    )


def _build_model(model_cfg: dict[str, Any], train_split):
    from .models import build_model

    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if not name:
        raise ValueError("recipe model.name is required, e.g. model.name=lenet_300_100.")
    seed = cfg.pop("seed", 0)
    pixels = getattr(train_split, "pixel_values", None)
    if pixels is not None:  # image sizes and classes come from the data unless the recipe pins them
        cfg.setdefault("num_channels", int(pixels.shape[1]))
        cfg.setdefault("image_size", int(pixels.shape[-1]))
        cfg.setdefault("num_labels", int(getattr(train_split, "num_labels", int(train_split.labels.max()) + 1)))
    import torch

    torch.manual_seed(seed)
    return build_model(name, **cfg)


def run_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Run a recipe: train (every IMP level), run its controls, export the ticket; return a summary."""
    from .lottery import write_report
    from .lottery.ticket import export_ticket

    trainer = build_trainer(recipe)
    trainer.train()
    root = trainer.args.output_dir
    summary: dict[str, Any] = {"output_dir": root}
    if trainer.sparsity_config.method == "imp":
        for kind in recipe.get("controls") or []:
            trainer.train_control(kind)
        summary["report"] = write_report(root)
        summary["ticket_dir"] = export_ticket(root, trainer, **(recipe.get("ticket") or {}))
    else:
        trainer.save_model(root)
        summary["ticket_dir"] = root
    return summary


def copy_tree_atomic(source: str, destination: str) -> None:
    tmp = destination + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if os.path.isdir(destination):
        shutil.rmtree(destination)
    os.replace(tmp, destination)


def default_recipe_path(name: str, search: Optional[str] = None) -> str:
    """`quickstart_digits` -> recipes/quickstart_digits.yaml (relative to the repo or the given folder)."""
    if os.path.isfile(name):
        return name
    folder = search or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    candidate = os.path.join(folder, name if name.endswith(".yaml") else name + ".yaml")
    return candidate if os.path.isfile(candidate) else name
