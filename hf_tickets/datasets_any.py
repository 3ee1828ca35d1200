"""Any image or text classification set: its columns found, its splits chosen or carved, its images decoded.

`hf_tickets.data.load_splits` hands this module a `datasets.DatasetDict` (from the Hub by id, a `save_to_disk`
folder, or data files that `datasets.load_dataset(path)` reads) and gets back train / validation / test with one
input column and one label column, plus what it did, so that the run can record it:

- Columns: given (`image_column`, `text_column`, `label_column`) or detected by name (`image` / `img` /
  `pixel_values`; `text` / `sentence`; `label` / `labels`), else by feature type (one `Image`, one `ClassLabel`).
  Two candidates, or none, is an error that lists the columns found.
- Splits: the set's own `validation` (or `valid` / `val` / `dev`) and `test` when present and labelled; otherwise
  carved from train with a seeded shuffle (test first, so the test set does not depend on the validation size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np

if TYPE_CHECKING:
    import datasets

IMAGE_COLUMNS = ("image", "img", "pixel_values")
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "labels")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
CARVE_FRACTION = 0.1  # validation / test carved from train when the set has none: 10% of train each


@dataclass
class ClassificationSplits:
    """What `select_splits` found: the three splits (still `datasets.Dataset`s), the columns and how they were made."""

    kind: str  # "image" or "text"
    input_column: str
    label_column: str
    splits: dict[str, Any]
    label_names: tuple[str, ...]
    split_rule: dict[str, str] = field(default_factory=dict)


def shuffled_split(n: int, *, test_size: int, validation_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded train/validation/test indices of one pool; test is cut first so it never depends on validation_size."""
    if test_size + validation_size >= n:
        raise ValueError(f"validation_size={validation_size} leaves no training data ({n} examples, {test_size} test)")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[test_size + validation_size :], perm[test_size : test_size + validation_size], perm[:test_size]


def detect_columns(
    features: Mapping[str, Any],
    *,
    image_column: Optional[str] = None,
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    where: str = "the data set",
) -> tuple[str, str, str]:
    """(kind, input column, label column) of a classification set; a clear ValueError when it cannot tell.

    Why names first: a Hub set's features often hold several string columns (ids, titles) and an image set may
    carry a second image (a mask); the conventional names are what datasets' own task templates used."""
    import datasets

    columns = list(features)
    listed = f"{where} has the columns {columns}"
    if image_column and text_column:
        raise ValueError("data.image_column and data.text_column are both set: a set is image or text, not both.")
    given = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
    for option, value in given.items():
        if value is not None and value not in features:
            raise ValueError(f"data.{option}={value!r} is not a column: {listed}.")
    if image_column or text_column:
        kind, column = ("image", image_column) if image_column else ("text", text_column)
    else:
        images = [c for c in IMAGE_COLUMNS if c in features]
        texts = [c for c in TEXT_COLUMNS if c in features]
        if not images and not texts:  # no conventional name: a single Image feature is still unambiguous
            images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        found = images + texts
        if len(found) != 1:
            why = f"several input columns {found}" if found else "no image or text column"
            raise ValueError(
                f"Cannot tell which column to train on: {listed}, with {why}. Name it with data.image_column=... "
                "or data.text_column=... (detected names: image/img/pixel_values, text/sentence)."
            )
        kind, column = ("image", found[0]) if images else ("text", found[0])
    if label_column is None:
        labels = [c for c in LABEL_COLUMNS if c in features]
        if not labels:
            labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel) and c != column]
        if len(labels) != 1:
            why = f"several label columns {labels}" if labels else "no label column"
            raise ValueError(
                f"Cannot tell which column holds the labels: {listed}, with {why}. Name it with "
                "data.label_column=... (detected names: label/labels, or a single ClassLabel column)."
            )
        label_column = labels[0]
    if label_column == column:
        raise ValueError(f"data: the label column and the {kind} column are both {column!r}; {listed}.")
    return kind, column, label_column


def _labelled(ds: "datasets.Dataset", label_column: str) -> bool:
    """False for a split whose labels are all negative (GLUE-style hidden test labels, -1)."""
    if len(ds) == 0:
        return False
    values = ds[label_column]
    return not all(isinstance(v, (int, np.integer)) and v < 0 for v in values)


def label_names(splits: Mapping[str, "datasets.Dataset"], label_column: str) -> tuple[tuple[str, ...], bool]:
    """Class names (index = label id) and whether the labels are strings that must be mapped to ids."""
    import datasets

    feature = splits["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names), False
    values = [v for ds in splits.values() for v in ds[label_column]]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ValueError(
                f"data: column {label_column!r} holds negative labels ({min(values)}); labels must be >= 0."
            )
        return tuple(str(i) for i in range(int(max(values)) + 1)), False
    if all(isinstance(v, str) for v in values):
        return tuple(sorted(set(splits["train"][label_column]))), True
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(
        f"data: column {label_column!r} holds {kinds}, not class labels (ints or strings); name another with "
        "data.label_column=...."
    )


def select_splits(
    raw: Mapping[str, "datasets.Dataset"],
    *,
    seed: int,
    validation_size: Optional[int] = None,
    test_size: Optional[int] = None,
    image_column: Optional[str] = None,
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    where: str = "the data set",
) -> ClassificationSplits:
    """Train / validation / test of a classification set: its own splits where it has them, carved where not."""
    if "train" not in raw:
        raise ValueError(f"{where} has no 'train' split (splits: {list(raw)}): a classification set needs one.")
    train = raw["train"]
    kind, column, label = detect_columns(
        train.features, image_column=image_column, text_column=text_column, label_column=label_column, where=where
    )
    rule: dict[str, str] = {"train": "the set's train split"}
    val_name = next((s for s in VALIDATION_SPLITS if s in raw and _labelled(raw[s], label)), None)
    test_name = "test" if "test" in raw and _labelled(raw["test"], label) else None
    for name in (val_name, test_name):
        if name is not None:
            missing = [c for c in (column, label) if c not in raw[name].features]
            if missing:
                raise ValueError(f"{where}: split {name!r} lacks the columns {missing} that 'train' has.")
    unlabelled = [s for s in (*VALIDATION_SPLITS, "test") if s in raw and not _labelled(raw[s], label)]
    n = len(train)
    default = max(1, int(round(CARVE_FRACTION * n)))
    n_test = 0 if test_name else (default if test_size is None else test_size)
    n_val = 0 if val_name else (default if validation_size is None else validation_size)
    if test_name and test_size is not None:
        raise ValueError(f"data.test_size={test_size} cannot apply: {where} has its own test split.")
    if val_name and validation_size is not None:
        raise ValueError(
            f"data.validation_size={validation_size} cannot apply: {where} has its own validation split "
            f"({val_name!r})."
        )
    train_idx, val_idx, test_idx = shuffled_split(n, test_size=n_test, validation_size=n_val, seed=seed)
    out = {"train": train.select(np.sort(train_idx)) if n_test + n_val else train}
    carved = f"carved from train by a shuffle with seed {seed}"
    if val_name:
        out["validation"], rule["validation"] = raw[val_name], f"the set's {val_name!r} split"
    else:
        out["validation"], rule["validation"] = train.select(np.sort(val_idx)), f"{n_val} examples {carved}"
    if test_name:
        out["test"], rule["test"] = raw["test"], "the set's 'test' split"
    else:
        out["test"], rule["test"] = train.select(np.sort(test_idx)), f"{n_test} examples {carved}"
    if n_test + n_val:
        rule["train"] = f"the set's train split less the carved examples ({n - n_test - n_val} of {n})"
    if unlabelled:
        rule["unused"] = f"splits {unlabelled} have no labels (all -1) and are not used"
    out = {split: ds.select_columns([column, label]) for split, ds in out.items()}
    names, strings = label_names(out, label)
    if strings:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({v for s in ("validation", "test") for v in out[s][label] if v not in index})
        if unknown:
            raise ValueError(f"{where}: labels {unknown[:5]} of validation/test never occur in train.")
        out = {s: ds.map(lambda b: {label: [index[v] for v in b[label]]}, batched=True) for s, ds in out.items()}
    return ClassificationSplits(kind, column, label, out, names, rule)


def decode_images(ds: "datasets.Dataset", column: str, image_size: Optional[int] = None) -> tuple[np.ndarray, bool]:
    """Images of a column as one array and whether they are raw pixels (uint8 [N, H, W(, C)], to be normalized) or
    already model inputs (float `pixel_values` [N, C, H, W], used as stored).

    All images must share one size (pass `image_size` to resize); grayscale stays one channel unless any image is
    in colour."""
    import datasets

    feature = ds.features[column]
    if not isinstance(feature, datasets.Image):
        arrays = np.asarray(ds.with_format("numpy", columns=[column])[column], dtype=np.float32)
        if arrays.ndim == 3:
            arrays = arrays[:, None]
        if arrays.ndim != 4:
            raise ValueError(
                f"data: column {column!r} holds arrays of shape {arrays.shape[1:]}; pixel values must be "
                "[C, H, W] or [H, W] per example (or the column must be a datasets.Image)."
            )
        if image_size is not None:
            raise ValueError(f"data.image_size resizes decoded images; column {column!r} holds stored pixel values.")
        return arrays, False
    images = ds[column]
    mode = "L" if all(img.mode in ("L", "1") for img in images) else "RGB"
    converted = [img.convert(mode) for img in images]
    if image_size is not None:
        from PIL import Image

        converted = [img.resize((image_size, image_size), Image.Resampling.BILINEAR) for img in converted]
    sizes = sorted({img.size for img in converted})
    if len(sizes) > 1:
        raise ValueError(
            f"data: the images of column {column!r} have {len(sizes)} sizes ({sizes[:4]}...); set data.image_size "
            "to resize them all to one square size."
        )
    return np.stack([np.asarray(img, dtype=np.uint8) for img in converted]), True
