"""Bad input fails early with a ValueError that names the field (DESIGN.md principle 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_bert, make_cnn, make_dataset, make_vit, training_args
from transformers import BertConfig, BertForSequenceClassification

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, apply_sparsity, load_masks
from hf_tickets.config import CONFIG_NAME
from hf_tickets.masks import MASKS_NAME

# ---- SparsityConfig fields ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_sparsity_outside_0_1(value, method):
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
        SparsityConfig(method=method, sparsity=value)


@pytest.mark.parametrize("value", ["0.5", True])
def test_sparsity_of_the_wrong_type_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"sparsity must be a number"):
        SparsityConfig(method="magnitude", sparsity=value)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_sparsity_is_required_for_one_shot_methods(method):
    with pytest.raises(ValueError, match="sparsity is required"):
        SparsityConfig(method=method)


@pytest.mark.parametrize("sparsity", [0.9, 0.3, 0.0])
def test_sparsity_that_contradicts_the_n_m_pattern(sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.*contradicts pattern='2:4'"):
        SparsityConfig(sparsity=sparsity, pattern="2:4")
    assert SparsityConfig(sparsity=0.5, pattern="2:4").nm == (2, 4)


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999])
def test_sparsity_inside_0_1(value):
    assert SparsityConfig(sparsity=value).sparsity == value


@pytest.mark.parametrize("value", ["magnitudes", "imp-typo", "", "Magnitude"])
def test_unknown_method(value):
    with pytest.raises(ValueError, match=r"method=.*unknown.*magnitude"):
        SparsityConfig(method=value)


@pytest.mark.parametrize("value", ["2:2", "4:2", "0:4", "2:0", "2:4:8", "a:b", "2-4", "", "structured", "-1:4"])
def test_unknown_pattern(value):
    with pytest.raises(ValueError, match="pattern"):
        SparsityConfig(pattern=value)


@pytest.mark.parametrize("value", ["local", "Global", "", "per-layer"])
def test_unknown_scope(value):
    with pytest.raises(ValueError, match=r"scope=.*global"):
        SparsityConfig(sparsity=0.5, scope=value)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_target_modules_of_the_wrong_type(field):
    with pytest.raises(ValueError, match=field):
        SparsityConfig(sparsity=0.5, **{field: 3})


@pytest.mark.parametrize(
    "value",
    [{"classifier": -0.5}, {"classifier": 2.0}, ["classifier"], '{"classifier": '],
)
def test_bad_layer_rates(value):
    with pytest.raises(ValueError, match="layer_rates"):
        SparsityConfig(sparsity=0.6, layer_rates=value)


def test_layer_rate_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"layer_rates\['classifier'\] must be a number"):
        SparsityConfig(sparsity=0.6, layer_rates={"classifier": "half"})


def test_seed_must_be_an_int():
    for value in ("0", True, 1.5):
        with pytest.raises(TypeError, match="seed must be an int"):
            SparsityConfig(sparsity=0.5, seed=value)


# ---- config vs model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [["nope"], r"bert\.nothing\..*", ["query.weight"]])
def test_target_modules_that_match_nothing(targets, tmp_path):
    cfg = SparsityConfig(sparsity=0.5, target_modules=targets)
    with pytest.raises(ValueError, match="target_modules"):
        apply_sparsity(make_bert(), cfg)
    with pytest.raises(ValueError, match="target_modules"):
        TicketTrainer(
            model=make_bert(), args=training_args(tmp_path), train_dataset=make_dataset("bert"), sparsity_config=cfg
        )


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_layer_rates_key_that_matches_nothing(method, scope):
    cfg = SparsityConfig(sparsity=0.5, method=method, scope=scope, layer_rates={"clasifier": 0.5})
    with pytest.raises(ValueError, match=r"layer_rates.*clasifier"):
        apply_sparsity(make_bert(), cfg)


def test_layer_rates_key_for_an_excluded_module():
    cfg = SparsityConfig(sparsity=0.5, exclude_modules=["classifier"], layer_rates={"classifier": 0.5})
    with pytest.raises(ValueError, match="layer_rates"):
        apply_sparsity(make_bert(), cfg)


def test_layer_rates_key_that_matches_nothing_with_n_m():
    cfg = SparsityConfig(pattern="2:4", layer_rates={"clasifier": 0.5})
    with pytest.raises(ValueError, match="layer_rates"):
        apply_sparsity(make_bert(), cfg)


def test_layer_rates_key_that_matches_nothing_with_imp_fails_before_level_0():
    # IMP only prunes after the dense level 0 has trained; the bad key must not wait that long.
    cfg = SparsityConfig(method="imp", levels=2, layer_rates={"clasifier": 0.5})
    with pytest.raises(ValueError, match="layer_rates"):
        apply_sparsity(make_bert(), cfg)


def test_n_m_on_a_dimension_not_divisible_by_m():
    # conv1 has 3 input channels: named by the user, it is an error; chosen by default, it stays dense (issue 12)
    with pytest.raises(ValueError, match=r"pattern='2:4'.*conv1"):
        apply_sparsity(make_cnn(), SparsityConfig(pattern="2:4", target_modules=["conv1"]))
    assert "conv1.weight" not in apply_sparsity(make_cnn(), SparsityConfig(pattern="2:4"))


def test_errors_leave_the_model_untouched():
    model = make_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        apply_sparsity(model, SparsityConfig(sparsity=0.5, layer_rates={"nope": 0.5}))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not hasattr(model, "hf_tickets_masks")


# ---- masks that do not fit the model ------------------------------------------------------------------------------


def _bert_masks(tmp_path, **config):
    model = BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **config)
    )
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    masks.save(tmp_path)
    return load_masks(tmp_path)


def test_masks_with_names_the_model_does_not_have(tmp_path):
    masks = _bert_masks(tmp_path, intermediate_size=64)
    with pytest.raises(ValueError, match=r"masks name parameters.*bert\.encoder"):
        apply_sparsity(make_vit(), SparsityConfig(sparsity=0.5), masks=masks)
    with pytest.raises(ValueError, match="masks name parameters"):
        TicketTrainer(model=make_vit(), args=training_args(tmp_path), train_dataset=make_dataset("vit"), masks=masks)


def test_masks_with_the_wrong_shapes(tmp_path):
    masks = _bert_masks(tmp_path, intermediate_size=48)  # the fixture BERT has 64
    with pytest.raises(ValueError, match=r"mask '.*intermediate\.dense\.weight' has shape \(48, 32\).*\(64, 32\)"):
        apply_sparsity(make_bert(), SparsityConfig(sparsity=0.5), masks=masks)
    with pytest.raises(ValueError, match="shape"):
        TicketTrainer(model=make_bert(), args=training_args(tmp_path), train_dataset=make_dataset("bert"), masks=masks)


def test_misfit_masks_leave_the_model_untouched(tmp_path):
    masks = _bert_masks(tmp_path, intermediate_size=48)
    model = make_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        apply_sparsity(model, SparsityConfig(sparsity=0.5), masks=masks)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ---- masks files that are not masks files -------------------------------------------------------------------------


@pytest.fixture
def masks_file(tmp_path):
    masks = apply_sparsity(make_bert(), SparsityConfig(sparsity=0.5))
    return masks.save(tmp_path / "good")


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.5, 0.99])
def test_truncated_masks_file(masks_file, tmp_path, fraction):
    data = Path(masks_file).read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="corrupted"):
        load_masks(bad)


def test_masks_file_missing_its_last_byte(masks_file, tmp_path):
    data = Path(masks_file).read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="corrupted"):
        load_masks(bad)


def test_random_text_is_not_a_masks_file(tmp_path):
    bad = tmp_path / MASKS_NAME
    bad.write_text("these are not the masks you are looking for\n" * 10)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_masks(tmp_path)
    with pytest.raises(ValueError):
        load_masks(bad)


def test_random_bytes_are_not_a_masks_file(tmp_path):
    bad = tmp_path / MASKS_NAME
    bad.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(ValueError, match="corrupted"):
        load_masks(bad)


def test_model_weights_are_not_masks(tmp_path):
    make_cnn().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not an hf_tickets masks file"):
        load_masks(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no masks file|has no masks.safetensors"):
        load_masks(tmp_path)  # a model folder without masks


def test_damaged_masks_header(masks_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(masks_file, framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
        header = fh.metadata()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=dict(header, hf_tickets_masks="{not json"))
    with pytest.raises(ValueError, match="damaged"):
        load_masks(tmp_path / "a.safetensors")
    info = json.loads(header["hf_tickets_masks"])
    first = next(iter(info["tensors"]))
    info["tensors"][first]["shape"] = [1000, 1000]  # more entries than the packed bits hold
    altered = dict(header, hf_tickets_masks=json.dumps(info))
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=altered)
    with pytest.raises(ValueError, match="header fails its checksum"):
        load_masks(tmp_path / "b.safetensors")
    from hf_tickets.masks import HEADER_SHA_KEY, _header_digest

    altered[HEADER_SHA_KEY] = _header_digest(altered)  # re-signed: the size check still refuses it
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=altered)
    with pytest.raises(ValueError, match="fewer"):
        load_masks(tmp_path / "c.safetensors")


def test_missing_masks_path(tmp_path):
    with pytest.raises(ValueError, match="masks"):
        MaskSet.load(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match=MASKS_NAME):
        load_masks(tmp_path)


# ---- config files ---------------------------------------------------------------------------------------------


def test_config_file_missing_or_invalid(tmp_path):
    with pytest.raises(ValueError, match=CONFIG_NAME):
        SparsityConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsityConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"sparsity": 1.5}))
    with pytest.raises(ValueError, match="sparsity"):
        SparsityConfig.from_pretrained(tmp_path)


def test_save_pretrained_onto_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="save_directory"):
        SparsityConfig(sparsity=0.5).save_pretrained(target)


# ---- TicketTrainer arguments ----------------------------------------------------------------------------------


def test_trainer_rejects_a_dict_config(tmp_path):
    with pytest.raises(ValueError, match="sparsity_config must be a SparsityConfig"):
        TicketTrainer(
            model=make_cnn(),
            args=training_args(tmp_path),
            train_dataset=make_dataset("cnn"),
            sparsity_config={"sparsity": 0.5},
        )


def test_trainer_needs_a_model(tmp_path):
    # Trainer's own error, as with stock Trainer (drop-in)
    with pytest.raises(RuntimeError, match="model"):
        TicketTrainer(
            args=training_args(tmp_path),
            train_dataset=make_dataset("cnn"),
            sparsity_config=SparsityConfig(sparsity=0.5),
        )
