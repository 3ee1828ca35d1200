"""Any classification set by Hub id or local folder (`load_splits` + `datasets_any`), and the data record a run keeps.

Every set here is built with `datasets` in tmp_path (a `save_to_disk` folder, parquet / csv files that
`datasets.load_dataset(folder)` reads); the Hub is never contacted: the Hub-id tests stub `load_dataset` or point
the probe at a closed local port.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hf_tickets import data
from hf_tickets.data import TensorImageDataset, load_splits
from hf_tickets.datasets_source import data_line
from hf_tickets.lottery.layout import level_dir

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything would reach the Hub (the probe or a Hub `load_dataset`)."""

    def boom(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted here")

    monkeypatch.setattr(data, "_hub_unreachable_reason", boom)
    monkeypatch.setattr(data, "_load_hub", boom)
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _images(n: int, size=(8, 8), mode="RGB", seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (*size[::-1], 3) if mode == "RGB" else size[::-1]
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode) for _ in range(n)]


def _image_set(column="img", n_train=40, n_test=10, names=("cat", "dog", "fish")) -> datasets.DatasetDict:
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    images = _images(n_train + n_test)
    labels = [i % len(names) for i in range(n_train + n_test)]
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({column: images[:n_train], "label": labels[:n_train]}, features),
            "test": datasets.Dataset.from_dict({column: images[n_train:], "label": labels[n_train:]}, features),
        }
    )


def _pixels(ds: TensorImageDataset, mean, std) -> np.ndarray:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return torch.round((ds.pixel_values * s + m) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------- local folders


def test_save_to_disk_image_set_carves_validation_with_the_seed(tmp_path, no_hub):
    raw = _image_set()
    raw.save_to_disk(tmp_path / "pets")
    splits = load_splits(str(tmp_path / "pets"), seed=3)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [36, 4, 10]
    assert all(isinstance(ds, TensorImageDataset) for ds in splits.values())
    assert tuple(splits["train"].pixel_values.shape[1:]) == (3, 8, 8) and splits["train"].label_names == [
        "cat",
        "dog",
        "fish",
    ]
    source = splits.source
    assert (source.source, source.kind) == ("local folder", "image")
    assert source.columns == {"image": "img", "label": "label"}
    assert "save_to_disk" in source.location and str(tmp_path / "pets") in source.location
    assert source.split_rule["test"] == "the set's 'test' split"
    assert source.split_rule["validation"] == "4 examples carved from train by a shuffle with seed 3"
    # Normalized with the train split's own statistics (recorded), and the pixels survive exactly.
    train = splits["train"].pixel_values
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert "per-channel mean/std" in source.note
    stats = [tuple(map(float, pair.split("/"))) for pair in source.note.rsplit("std ", 1)[1].split(", ")]
    mean, std = [m for m, _ in stats], [s for _, s in stats]
    test_pixels = _pixels(splits["test"], mean, std)
    expected = np.stack([np.asarray(img) for img in raw["test"]["img"]])
    assert np.abs(test_pixels.astype(int) - expected.astype(int)).max() <= 1  # 4-decimal stats in the note
    # The carve is seeded: the same seed gives the same validation images, another seed others.
    again, other = load_splits(str(tmp_path / "pets"), seed=3), load_splits(str(tmp_path / "pets"), seed=4)
    assert torch.equal(again["validation"].pixel_values, splits["validation"].pixel_values)
    assert not torch.equal(other["validation"].pixel_values, splits["validation"].pixel_values)
    assert torch.equal(other["test"].labels, splits["test"].labels)  # the set's own test split, whatever the seed


def test_parquet_text_folder_uses_its_own_splits_and_maps_string_labels(tmp_path, no_hub):
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, n in (("train", 30), ("validation", 6), ("test", 8)):
        frame = pd.DataFrame({"sentence": [f"{split} {i}" for i in range(n)], "labels": ["pos", "neg"] * (n // 2)})
        frame.to_parquet(folder / f"{split}.parquet")
    splits = load_splits(str(folder), max_train_samples=10)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [10, 6, 8]
    for ds in splits.values():
        assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text", "label"]
        assert ds.features["label"].names == ["neg", "pos"]  # sorted names; "pos" -> 1
    assert splits["test"]["label"][:2] == [1, 0] and splits["test"]["text"][0] == "test 0"
    source = splits.source
    assert source.columns == {"text": "sentence", "label": "labels"} and source.kind == "text"
    assert source.split_rule == {
        "train": "the set's train split; a random subset of 10 (max_train_samples)",
        "validation": "the set's 'validation' split",
        "test": "the set's 'test' split",
    }
    with pytest.raises(ValueError, match="validation_size=3 cannot apply.*own validation split"):
        load_splits(str(folder), validation_size=3)


def test_csv_file_carves_validation_and_test(tmp_path, no_hub):
    path = tmp_path / "sms.csv"
    pd.DataFrame({"text": [f"message {i}" for i in range(50)], "label": [i % 2 for i in range(50)]}).to_csv(path)
    splits = load_splits(str(path), validation_size=5, test_size=7, seed=1)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [38, 5, 7]
    texts = [set(splits[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert splits["train"].features["label"].names == ["0", "1"]
    assert splits.source.split_rule["test"] == "7 examples carved from train by a shuffle with seed 1"
    assert "csv file" in splits.source.location


def test_unlabelled_test_split_is_not_used(tmp_path, no_hub):
    """GLUE-style hidden test labels (-1): the test split is carved from train instead, and the record says so."""
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64")})
    raw = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": list("abcdefghijklmnopqrst"), "label": [0, 1] * 10},
                                                features),
            "test": datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [-1, -1]}, features),
        }
    )
    raw.save_to_disk(tmp_path / "glue")
    splits = load_splits(str(tmp_path / "glue"))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [16, 2, 2]
    assert "x" not in splits["test"]["text"]
    assert "['test'] have no labels" in splits.source.split_rule["unused"]


def test_stored_pixel_values_are_used_as_stored(tmp_path, no_hub):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12, 1, 4, 4)).astype(np.float32)
    raw = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"pixel_values": values.tolist(), "labels": [0, 1, 2] * 4})}
    )
    raw.save_to_disk(tmp_path / "tensors")
    splits = load_splits(str(tmp_path / "tensors"), validation_size=2, test_size=2)
    pool = torch.cat([splits[s].pixel_values for s in ("train", "validation", "test")])
    assert pool.shape == (12, 1, 4, 4)
    assert sorted(map(tuple, pool.reshape(12, -1).tolist())) == sorted(map(tuple, values.reshape(12, -1).tolist()))
    assert "used as stored" in splits.source.note


def test_images_of_several_sizes_need_image_size(tmp_path, no_hub):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = _images(6, (8, 8), "L") + _images(6, (10, 6), "L", seed=1)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 6}, features)})
    raw.save_to_disk(tmp_path / "mixed")
    with pytest.raises(ValueError, match="2 sizes.*data.image_size"):
        load_splits(str(tmp_path / "mixed"), validation_size=2, test_size=2)
    splits = load_splits(str(tmp_path / "mixed"), validation_size=2, test_size=2, image_size=5)
    assert tuple(splits["train"].pixel_values.shape[1:]) == (1, 5, 5)  # grayscale stays one channel


def test_folder_copy_of_a_built_in_set_gets_the_hub_sets_splits(tmp_path, no_hub):
    """data.path: a save_to_disk copy of ylecun/mnist is split and normalized exactly like the Hub set."""
    gray = np.random.default_rng(0).integers(0, 256, size=(14, 28, 28), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    images, labels = [Image.fromarray(im) for im in gray], [i % 10 for i in range(14)]
    raw = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": images[:10], "label": labels[:10]}, features),
            "test": datasets.Dataset.from_dict({"image": images[10:], "label": labels[10:]}, features),
        }
    )
    raw.save_to_disk(tmp_path / "mnist")
    splits = load_splits("mnist", path=str(tmp_path / "mnist"), validation_size=3)
    val = torch.round((splits["validation"].pixel_values * data.MNIST_STD[0] + data.MNIST_MEAN[0]) * 255)
    np.testing.assert_array_equal(val[:, 0].to(torch.uint8).numpy(), gray[7:10])  # the last 3 train images
    source = splits.source
    assert (source.name, source.source, source.copy) == ("ylecun/mnist", "local folder", None)
    assert source.split_rule["validation"] == "the last 3 images of the official train split (any seed)"
    with pytest.raises(ValueError, match=r"splits \['test'\] are missing"):
        datasets.DatasetDict({"train": raw["train"]}).save_to_disk(tmp_path / "half")
        load_splits("mnist", path=str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="nowhere: data.path does not exist"):
        load_splits("mnist", path="nowhere")
    # A set by id with a folder copy keeps its id in the record; the Hub is not contacted (no_hub).
    _image_set().save_to_disk(tmp_path / "pets")
    pets = load_splits("someone/pets", path=str(tmp_path / "pets"))
    assert pets.source.name == "someone/pets" and str(tmp_path / "pets") in pets.source.location


# --------------------------------------------------------------------------------------------- column detection


@pytest.mark.parametrize(
    "columns, options, match",
    [
        ({"image": "img", "text": "str"}, {}, r"several input columns \['image', 'text'\]"),
        ({"img": "img", "image": "img"}, {}, r"several input columns \['image', 'img'\]"),
        ({"caption": "str"}, {}, r"columns \['caption', 'label'\], with no image or text column"),
        ({"text": "str"}, {"text_column": "body"}, r"data.text_column='body' is not a column"),
        ({"text": "str"}, {"image_column": "text", "text_column": "text"}, "both set"),
    ],
)
def test_undetectable_input_column_lists_the_columns(tmp_path, no_hub, columns, options, match):
    make = {"img": lambda n: _images(n), "str": lambda n: [f"s{i}" for i in range(n)]}
    table = {name: make[kind](10) for name, kind in columns.items()}
    table["label"] = [0, 1] * 5
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(tmp_path / "set")
    with pytest.raises(ValueError, match=match):
        load_splits(str(tmp_path / "set"), **options)


def test_label_column_detection(tmp_path, no_hub):
    texts = [f"s{i}" for i in range(10)]
    datasets.Dataset.from_dict({"text": texts, "stars": [1, 2] * 5}).save_to_disk(tmp_path / "none")
    with pytest.raises(ValueError, match=r"columns \['text', 'stars'\], with no label column.*data.label_column"):
        load_splits(str(tmp_path / "none"))
    assert load_splits(str(tmp_path / "none"), label_column="stars").source.columns["label"] == "stars"
    both = datasets.Dataset.from_dict({"text": texts, "label": [0, 1] * 5, "labels": [1, 0] * 5})
    both.save_to_disk(tmp_path / "both")
    with pytest.raises(ValueError, match=r"several label columns \['label', 'labels'\]"):
        load_splits(str(tmp_path / "both"))
    # No conventional name, but one ClassLabel and one Image feature: unambiguous.
    features = datasets.Features({"photo": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y"])})
    typed = datasets.Dataset.from_dict({"photo": _images(10), "kind": [0, 1] * 5}, features)
    typed.save_to_disk(tmp_path / "typed")
    assert load_splits(str(tmp_path / "typed")).source.columns == {"image": "photo", "label": "kind"}


# --------------------------------------------------------------------------------------------- Hub ids and paths


def test_missing_local_path_is_never_sent_to_the_hub(tmp_path, no_hub):
    for name in (str(tmp_path / "nope"), "./data/nope", "data/sets/nope", "reviews.csv"):
        with pytest.raises(FileNotFoundError, match="looks like a local path and does not exist"):
            load_splits(name)


def test_set_by_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load(name):
        calls.append(name)
        return _image_set(column="image", n_train=20, n_test=5)

    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(data, "_load_hub", fake_load)
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    splits = load_splits("someone/pets", validation_size=4)
    assert calls == ["someone/pets"]
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [16, 4, 5]
    assert (splits.source.source, splits.source.location) == ("hub", "someone/pets")
    assert data_line(splits.source.to_dict()) == (
        "trained on someone/pets from the Hugging Face Hub; splits: 16 train, 4 validation, 5 test"
    )


def test_set_by_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    """The real probe against a closed local port: one short request, no load_dataset retry loop, and the fix."""
    import huggingface_hub

    def no_load(*args, **kwargs):
        raise AssertionError("load_dataset must not run when the endpoint is down")

    monkeypatch.setattr(data, "_load_hub", no_load)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as err:
        load_splits("someone/pets")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "http://127.0.0.1:9 unreachable" in message and "save_to_disk" in message and "data.path" in message


def test_set_by_id_in_offline_mode_reads_only_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda: pytest.fail("no probe in offline mode"))

    def not_cached(name):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data, "_load_hub", not_cached)
    with pytest.raises(FileNotFoundError, match="not in the local HF cache and HF offline mode is set.*save_to_disk"):
        load_splits("someone/pets")


# --------------------------------------------------------------------------------------------- recipes and runs


def _digits_folder(path) -> str:
    """sklearn's digits as a user's own `datasets` folder: 8x8 grayscale images, a ClassLabel."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), "L") for img in digits.images[:300]]
    table = {"image": images, "label": digits.target[:300].tolist()}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features)}).save_to_disk(path)
    return str(path)


QUICK = [
    "training.max_steps=4",
    "training.eval_steps=2",
    "training.logging_steps=2",
    "sparsity.levels=1",
    "sparsity.rewind_step=1",
    "controls=[]",
]


def test_recipe_with_a_folder_records_the_data_in_every_level_and_the_card(tmp_path):
    from hf_tickets.recipes import load_recipe, run_recipe

    folder = _digits_folder(tmp_path / "my_digits")
    out = tmp_path / "run"
    recipe = load_recipe(
        "recipes/quickstart_digits.yaml",
        [f"training.output_dir={out}", f"data.name={folder}", "data.max_eval_samples=20", *QUICK],
    )
    summary = run_recipe(recipe)
    for level in (0, 1):
        record = json.loads((Path(level_dir(str(out), level)) / "metrics.json").read_text())["data"]
        assert record["name"] == folder and record["source"] == "local folder" and record["kind"] == "image"
        assert record["splits"] == {"train": 240, "validation": 20, "test": 20}  # measured after max_eval_samples
        assert record["split_rule"]["validation"].endswith("; its first 20 (max_eval_samples)")
    report = json.loads((out / "imp_report.json").read_text())
    assert all(row["data"]["name"] == folder for row in report["trunk"])
    card = (out / "ticket" / "README.md").read_text()
    assert summary["ticket_dir"] == str(out / "ticket")
    assert f"### Data\n\nTrained on the local data set {folder} (datasets.save_to_disk); splits: 240 train" in card


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.allow_smoke_cpy=true", r"data options \['allow_smoke_cpy'\] are unknown"),
        ("data.allow_smoke_copy=sure", "data.allow_smoke_copy='sure' must be true or false"),
        ("data.offline=maybe", "data.offline='maybe' must be true, false or null"),
        ("data.label_column=3", "data.label_column=3 must be a column name"),
    ],
)
def test_bad_data_options_fail_before_loading(override, match, tmp_path, no_hub):
    from hf_tickets.recipes import build_trainer, load_recipe

    recipe = load_recipe("recipes/quickstart_digits.yaml", [f"training.output_dir={tmp_path / 'run'}", override])
    with pytest.raises(ValueError, match=match):
        build_trainer(recipe)


def test_smoke_copy_run_says_so_in_metrics_report_and_card(tmp_path, capsys):
    """CIFAR-10 offline: refused by the CLI (exit 2, the fix in one line); allowed, every record says it."""
    from hf_tickets.cli import main

    out = tmp_path / "run"
    argv = [
        "run",
        "recipes/conv2_cifar10.yaml",
        f"training.output_dir={out}",
        "training.use_cpu=true",
        "data.on_device=false",
        "training.per_device_train_batch_size=4",
        "data.offline=true",
        *QUICK[:3],
        "sparsity.levels=1",
        "controls=[]",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "smoke-test copy" in err and "data.allow_smoke_copy=true" in err and not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the smoke copy's own warning
        assert main([*argv, "data.allow_smoke_copy=true"]) == 0
    record = json.loads((Path(level_dir(str(out), 1)) / "metrics.json").read_text())["data"]
    assert record["copy"] == "smoke-test copy" and record["splits"] == {"train": 12, "validation": 4, "test": 4}
    report = json.loads((out / "imp_report.json").read_text())
    assert {row["data"]["copy"] for row in report["trunk"]} == {"smoke-test copy"}
    card = (out / "ticket" / "README.md").read_text()
    assert "**Warning: not the real data set.**" in card
    assert "Trained on 12 images of a smoke-test copy of uoft-cs/cifar10" in card
    assert "model-index" not in card  # no accuracy claimed on CIFAR-10 from 4 test images


def test_hub_dataset_id_names_only_hub_sets(tmp_path):
    """What `hf-tickets run` puts in the card's `datasets` metadata: Hub ids, never a local folder."""
    from hf_tickets.data import hub_dataset_id

    assert hub_dataset_id("mnist") == "ylecun/mnist" and hub_dataset_id("cifar10") == "uoft-cs/cifar10"
    assert hub_dataset_id("someone/pets") == "someone/pets"
    for local in ("digits", "sklearn/digits", str(tmp_path), "./data/x", "reviews.csv", ""):
        assert hub_dataset_id(local) is None, local
