"""SparsityConfig: dataclass, dict/JSON round trips, forward compatibility, stable hash (peft test_config style)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle

import pytest

from hf_tickets import SparsityConfig, __version__
from hf_tickets.config import CONFIG_NAME

CONFIG_CASES = [
    {"sparsity": 0.5},
    {"method": "random", "sparsity": 0.9, "seed": 7},
    {"method": "magnitude", "sparsity": 0.3, "scope": "layerwise"},
    {"pattern": "2:4"},
    {"sparsity": 0.5, "target_modules": ["query", "value"], "exclude_modules": "classifier"},
    {"sparsity": 0.5, "target_modules": r".*\.dense", "layer_rates": {"classifier": 0.5}},
    {"sparsity": 0.5, "layer_rates": '{"classifier": 0.5}'},
    {"method": "imp", "levels": 3, "rewind": "step", "rewind_step": 100},
    {"method": "imp", "sparsity": 0.9, "prune_fraction": 0.5, "rewind": "lr", "rewind_step": 0.1},
]


def test_is_a_dataclass_with_help_on_every_field():
    assert dataclasses.is_dataclass(SparsityConfig)
    for f in dataclasses.fields(SparsityConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_defaults():
    cfg = SparsityConfig(sparsity=0.5)
    assert (cfg.method, cfg.sparsity, cfg.pattern, cfg.scope, cfg.seed) == (
        "magnitude",
        0.5,
        "unstructured",
        "global",
        0,
    )
    assert cfg.target_modules is None and cfg.exclude_modules is None and cfg.layer_rates is None
    assert cfg.nm is None
    assert SparsityConfig(pattern="2:4").nm == (2, 4)


@pytest.mark.parametrize("kwargs", CONFIG_CASES)
def test_to_dict_is_asdict(kwargs):
    cfg = SparsityConfig(**kwargs)
    d = cfg.to_dict()
    assert d == dataclasses.asdict(cfg)
    assert set(d) == {f.name for f in dataclasses.fields(type(cfg))}
    json.dumps(d)  # JSON-serialisable as is


@pytest.mark.parametrize("kwargs", CONFIG_CASES)
def test_save_and_from_pretrained_round_trip(tmp_path, kwargs):
    cfg = SparsityConfig(**kwargs)
    cfg.save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    assert path.is_file()
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == sorted(data), "keys must be written sorted"
    assert data["hf_tickets_version"] == __version__
    assert text.endswith("\n")
    loaded = SparsityConfig.from_pretrained(tmp_path)
    assert loaded == cfg
    assert loaded.hashname() == cfg.hashname()
    assert not [p for p in os.listdir(tmp_path) if p != CONFIG_NAME], "no temporary files may be left behind"


@pytest.mark.parametrize("kwargs", CONFIG_CASES)
def test_from_dict_pickle_and_deepcopy(kwargs):
    cfg = SparsityConfig(**kwargs)
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_save_pretrained_creates_directory(tmp_path):
    SparsityConfig(sparsity=0.5).save_pretrained(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / CONFIG_NAME).is_file()


def test_unknown_keys_are_dropped_with_a_warning(tmp_path, caplog):
    data = dict(SparsityConfig(sparsity=0.8).to_dict(), hf_tickets_version="99.0", from_the_future=1, zeta="z")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        cfg = SparsityConfig.from_pretrained(tmp_path)
    assert cfg == SparsityConfig(sparsity=0.8)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "from_the_future" in warnings[0].getMessage() and "zeta" in warnings[0].getMessage()
    # the version stamp is a known key, not an unknown one
    assert "hf_tickets_version" not in warnings[0].getMessage()


def test_no_warning_for_own_files(tmp_path, caplog):
    SparsityConfig(method="random", sparsity=0.5).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_tickets"):
        SparsityConfig.from_pretrained(tmp_path)
    assert not caplog.records


def test_older_file_without_new_fields_loads_with_defaults():
    assert SparsityConfig.from_dict({"sparsity": 0.7}) == SparsityConfig(sparsity=0.7)


# ---- normalisation --------------------------------------------------------------------------------------------


def test_layer_rates_json_string_is_parsed():
    assert SparsityConfig(sparsity=0.5, layer_rates='{"classifier": 0.5}').layer_rates == {"classifier": 0.5}


def test_sparsity_int_becomes_float():
    cfg = SparsityConfig(sparsity=0)
    assert cfg.sparsity == 0.0 and isinstance(cfg.sparsity, float)


def test_tuple_and_set_targets_become_sorted_lists():
    assert SparsityConfig(sparsity=0.5, target_modules=("value", "query")).target_modules == ["query", "value"]
    assert SparsityConfig(sparsity=0.5, exclude_modules={"b", "a"}).exclude_modules == ["a", "b"]


# ---- stable hash ---------------------------------------------------------------------------------------------


PINNED_2_4 = "fbafe1b1f4"


def test_hash_is_short_and_pinned():
    # Pinned values: a change here renames every existing run directory, so it must be deliberate.
    assert SparsityConfig(pattern="2:4").hashname() == PINNED_2_4
    assert SparsityConfig(sparsity=0.9).hashname() == "59d899a8a2"
    assert (
        SparsityConfig(method="random", sparsity=0.8, seed=3, target_modules=["query", "value"]).hashname()
        == "beb021db9d"
    )
    assert len(SparsityConfig(sparsity=0.9).hashname(length=6)) == 6


def test_hash_ignores_defaults():
    assert (
        SparsityConfig(sparsity=0.9).hashname() == SparsityConfig(method="magnitude", sparsity=0.9, seed=0).hashname()
    )
    assert SparsityConfig(sparsity=0.9).hashname() == SparsityConfig(sparsity=0.9, scope="global").hashname()
    assert SparsityConfig(sparsity=0.9).non_default_fields() == {"sparsity": 0.9}
    assert SparsityConfig(pattern="2:4").non_default_fields() == {"pattern": "2:4"}


def test_hash_is_independent_of_argument_order():
    a = SparsityConfig(method="random", seed=3, sparsity=0.8)
    b = SparsityConfig(sparsity=0.8, seed=3, method="random")
    assert a.hashname() == b.hashname()


def test_hash_changes_with_every_field():
    base = SparsityConfig(sparsity=0.5).hashname()
    variants = [
        {"method": "random"},
        {"sparsity": 0.9},
        {"pattern": "2:4"},
        {"scope": "layerwise"},
        {"target_modules": ["query"]},
        {"exclude_modules": ["classifier"]},
        {"layer_rates": {"classifier": 0.5}},
        {"seed": 1},
        {"method": "imp", "sparsity": None, "levels": 2},
        {"method": "imp", "sparsity": None, "levels": 2, "prune_fraction": 0.5},
        {"method": "imp", "sparsity": None, "levels": 2, "rewind": "step", "rewind_step": 10},
    ]
    hashes = {SparsityConfig(**dict({"sparsity": 0.5}, **kw)).hashname() for kw in variants}
    assert base not in hashes and len(hashes) == len(variants)


def test_adding_a_field_with_a_default_keeps_old_hashes():
    @dataclasses.dataclass
    class NewerConfig(SparsityConfig):
        new_knob: int = dataclasses.field(default=3, metadata={"help": "added later"})

    assert NewerConfig(sparsity=0.9).hashname() == SparsityConfig(sparsity=0.9).hashname()
    assert NewerConfig(sparsity=0.9, new_knob=4).hashname() != SparsityConfig(sparsity=0.9).hashname()


# ---- CLI parsing (DESIGN.md section 7.2) ----------------------------------------------------------------------


def test_hf_argument_parser_parses_the_config():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser((SparsityConfig,)).parse_args_into_dataclasses(
        ["--method", "random", "--sparsity", "0.9", "--layer_rates", '{"classifier": 0.5}'], look_for_args_file=False
    )
    assert cfg.method == "random" and cfg.sparsity == 0.9 and cfg.layer_rates == {"classifier": 0.5}


def test_hf_argument_parser_parses_a_methods_own_config():
    from transformers import HfArgumentParser

    from hf_tickets import IMPConfig

    (cfg,) = HfArgumentParser((IMPConfig,)).parse_args_into_dataclasses(
        ["--levels", "3", "--rewind", "step", "--rewind_step", "0.05"], look_for_args_file=False
    )
    assert isinstance(cfg, IMPConfig) and cfg.method == "imp" and cfg.levels == 3 and cfg.rewind_step == 0.05
    (built,) = HfArgumentParser((SparsityConfig,)).parse_args_into_dataclasses(
        ["--method", "imp", "--sparsity", "0.5"], look_for_args_file=False
    )
    assert isinstance(built, IMPConfig) and built.num_levels() == 4


def test_config_of_one_method_rejects_another_method():
    from hf_tickets import IMPConfig

    with pytest.raises(ValueError, match="config of method='imp'"):
        IMPConfig(method="magnitude", sparsity=0.5)
    loaded = SparsityConfig.from_dict({"method": "imp", "levels": 2, "rewind": "init"})
    assert isinstance(loaded, IMPConfig) and loaded.levels == 2
