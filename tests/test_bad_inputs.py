"""Every bad input of issue 16's list fails before training with a ValueError or TypeError naming the field, the value
and the fix (table-driven), and the CLI turns bad input and I/O errors into one line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import training_args

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.cli import main
from hf_tickets.models import build_model
from hf_tickets.recipes import load_recipe

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart_digits.yaml")


def _model():
    return build_model("lenet_300_100", hidden_sizes=[16], image_size=8, num_channels=1, num_labels=10)


def _trainer(tmp_path, **config):
    return TicketTrainer(model=_model(), args=training_args(tmp_path), sparsity_config=SparsityConfig(**config))


CONFIG_CASES = [
    # (what, kwargs, error type, words the message must hold)
    (
        "unquoted 2:4 in YAML is the int 124",
        dict(method="magnitude", pattern=124),
        TypeError,
        ["pattern", "124", '"2:4"'],
    ),
    ("sparsity as a string", dict(method="magnitude", sparsity="0.5"), TypeError, ["sparsity", "'0.5'", "number"]),
    ("sparsity NaN", dict(method="magnitude", sparsity=float("nan")), ValueError, ["sparsity", "nan"]),
    ("seed=True", dict(method="magnitude", sparsity=0.5, seed=True), TypeError, ["seed", "True", "int"]),
    (
        "invalid target regex",
        dict(method="magnitude", sparsity=0.5, target_modules="hidden["),
        ValueError,
        ["target_modules", "hidden[", "regex"],
    ),
    (
        "invalid exclude regex",
        dict(method="magnitude", sparsity=0.5, exclude_modules="(x"),
        ValueError,
        ["exclude_modules", "(x", "regex"],
    ),
    (
        "NaN layer_rates factor",
        dict(method="magnitude", sparsity=0.5, layer_rates={"hidden.0": float("nan")}),
        ValueError,
        ["layer_rates", "nan"],
    ),
    (
        "layer_rates factor as a string",
        dict(method="magnitude", sparsity=0.5, layer_rates={"hidden.0": "0.5"}),
        TypeError,
        ["layer_rates", "'0.5'", "number"],
    ),
    (
        "IMP field with magnitude",
        dict(method="magnitude", sparsity=0.5, prune_fraction=0.2),
        TypeError,
        ["prune_fraction", "imp"],
    ),
]


@pytest.mark.parametrize("what, kwargs, error, words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_name_the_field_and_the_fix(what, kwargs, error, words):
    with pytest.raises(error) as info:
        SparsityConfig(**kwargs)
    for word in words:
        assert word in str(info.value), (what, str(info.value))


MODEL_CASES = [
    (
        "a misspelt exclude_modules entry",
        dict(method="magnitude", sparsity=0.5, exclude_modules=["hiden"]),
        ["exclude_modules", "hiden", "hidden.0"],
    ),
    (
        "layer-wise sparsity that keeps no weight",
        dict(method="magnitude", sparsity=0.999999, scope="layerwise"),
        ["keeps no weight", "hidden.0.weight", "lower sparsity"],
    ),
    (
        "a misspelt target_modules entry",
        dict(method="magnitude", sparsity=0.5, target_modules=["hiden"]),
        ["target_modules", "hiden"],
    ),
]


@pytest.mark.parametrize("what, kwargs, words", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_inputs_for_the_model_fail_before_anything_changes(tmp_path, what, kwargs, words):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        TicketTrainer(model=model, args=training_args(tmp_path), sparsity_config=SparsityConfig(**kwargs))
    for word in words:
        assert word in str(info.value), (what, str(info.value))
    assert all((before[k] == v).all() for k, v in model.state_dict().items()), "the model changed"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"[1, 2]", ["list", "not a JSON object"]),
        (b"null", ["NoneType"]),
        (b'"x"', ["str"]),
        (b"\xff\xfe\x00", ["not valid JSON"]),
        (b"{", ["not valid JSON"]),
    ],
    ids=["array", "null", "string", "not utf-8", "truncated"],
)
def test_bad_sparsity_config_files(tmp_path, content, words):
    (tmp_path / "sparsity_config.json").write_bytes(content)
    with pytest.raises(ValueError) as info:
        SparsityConfig.from_pretrained(str(tmp_path))
    for word in words:
        assert word in str(info.value)


def test_a_newer_version_stamp_is_said(tmp_path, caplog):
    (tmp_path / "sparsity_config.json").write_text(
        '{"method": "magnitude", "sparsity": 0.5, "hf_tickets_version": "99.1"}'
    )
    assert SparsityConfig.from_pretrained(str(tmp_path)).sparsity == 0.5
    assert "written by hf_tickets 99.1" in caplog.text
    (tmp_path / "sparsity_config.json").write_text('{"method": "magnitude", "sparsity": 0.5, "hf_tickets_version": 3}')
    with pytest.raises(ValueError, match="invalid hf_tickets_version"):
        SparsityConfig.from_pretrained(str(tmp_path))


def test_cli_bad_yaml_values_and_io_errors_are_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert main(["run", str(bad_yaml)]) == 2
    assert capsys.readouterr().err.startswith("hf-tickets: error:")
    assert main(["run", QUICKSTART, "training.max_steps=abc", f"training.output_dir={tmp_path / 'o'}"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["run", QUICKSTART, "sparsity.pattern=2:4", f"training.output_dir={tmp_path / 'o'}"]) == 2
    assert '"2:4"' in capsys.readouterr().err
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")  # an output_dir under a file: an OSError, as a full disk or a permission is
    code = main(["run", QUICKSTART, f"training.output_dir={not_a_folder / 'run'}", "training.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("hf-tickets: error:") and err.count("\n") == 1, err


def test_unquoted_pattern_in_a_recipe(tmp_path):
    recipe = load_recipe(QUICKSTART, ["sparsity.pattern=2:4"])
    assert recipe["sparsity"]["pattern"] == 124  # YAML 1.1 sexagesimal: what the user typed is not what YAML reads
    with pytest.raises(ValueError, match='"2:4"'):
        from hf_tickets.recipes import build_trainer

        build_trainer(dict(recipe, training=dict(recipe["training"], output_dir=str(tmp_path))))
