"""What a newcomer types on a fresh clone: options after the overrides, Ctrl-C, a mistyped recipe path or override,
a mistyped local model folder in a text recipe, a misspelt method, one control kind without brackets, and the
console of `hf-tickets stability` (issue 15's checks, found by running the CLI as a new user)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_overrides import tiny  # tests/ is on sys.path (pytest rootdir-relative import)

from hf_tickets import cli
from hf_tickets.cli import main
from hf_tickets.files import STEP_LOG_NAME

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart_digits.yaml")


# ---- options may follow the overrides; Ctrl-C is one line


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["run", "r.yaml", "--log-steps", "a.b=1", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["run", "r.yaml", "a.b=1", "--log-steps", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["run", "--log-steps", "r.yaml", "a.b=1"], ["a.b=1"]),
        (["stability", "runs/x", "--points", "3", "a.b=1"], ["a.b=1"]),
    ],
)
def test_overrides_may_follow_the_options(argv, overrides):
    opts = cli._parse(argv)
    assert opts.overrides == overrides
    assert getattr(opts, "log_steps", False) == ("--log-steps" in argv)


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli._parse(["run", "r.yaml", "a.b=1", "--verbose", "c.d=2"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --verbose c.d=2" in capsys.readouterr().err


def test_overrides_after_an_option_reach_the_recipe(capsys):
    assert main(["run", QUICKSTART, "--log-steps", "trainin.max_steps=3"]) == 2
    assert "override 'trainin.max_steps=3' names no recipe section" in capsys.readouterr().err


def test_ctrl_c_is_one_line_that_says_how_to_go_on(monkeypatch, capsys):
    def interrupted(opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_run", interrupted)
    assert main(["run", QUICKSTART]) == 130
    err = capsys.readouterr().err
    assert "hf-tickets: interrupted; finished levels are kept: run the same command again" in err
    assert "Traceback" not in err


# ---- a mistyped recipe path or override fails before torch is imported


def test_a_missing_recipe_fails_before_torch_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from hf_tickets.cli import main\n"
        "print(main(['run', 'recipes/nope.yaml']), main(['run', 'quickstart_digits', 'sparsity.sparsity==0.5']), "
        "'torch' in sys.modules)"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.stdout.split() == ["2", "2", "False"], result.stderr
    assert time.monotonic() - started < 5
    assert "recipe 'recipes/nope.yaml' not found" in result.stderr
    assert "override 'sparsity.sparsity==0.5' has '=='" in result.stderr and "sparsity.sparsity=0.5" in result.stderr


def test_accuracy_is_still_importable_from_recipes():
    from hf_tickets.lottery.metrics import accuracy
    from hf_tickets.recipes import accuracy as from_recipes

    assert from_recipes is accuracy


# ---- a mistyped local model folder is an error, offline fallback or not


def test_a_missing_local_model_folder_is_not_replaced_by_the_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = str(REPO / "recipes" / "bert_rotten_tomatoes.yaml")  # offline_fallback: minilm
    started = time.monotonic()
    assert main(["run", recipe, "model.pretrained=./nope_model", f"training.output_dir={tmp_path / 'run'}"]) == 2
    assert time.monotonic() - started < 5
    assert "./nope_model: missing folder (model.pretrained looks like a local path" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    from hf_tickets.hub_probe import MissingPathError
    from hf_tickets.recipes import resolve_pretrained

    with pytest.raises(MissingPathError, match="nope_model"):
        resolve_pretrained("./nope_model", "minilm")


# ---- a misspelt method is named as the mistake


@pytest.mark.parametrize("method", ["imq", "foo"])
def test_an_unknown_method_with_imp_fields_names_the_method(method):
    from hf_tickets.config import SparsityConfig

    with pytest.raises(ValueError, match=f"method='{method}' is unknown: choose one of") as exc:
        SparsityConfig(method=method, prune_fraction=0.2, levels=2)
    assert "has no field" not in str(exc.value)


# ---- one control kind or level without brackets


def test_one_control_kind_and_one_control_level_without_brackets(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, *tiny(out), "controls=reinit", "control_levels=1"]) == 0
    assert (tmp_path / "run.reinit" / "level_01").is_dir() and not (tmp_path / "run.reinit" / "level_02").exists()
    assert main(["run", QUICKSTART, *tiny(tmp_path / "other"), "control_levels=abc"]) == 2
    assert "control_levels='abc' must be a list of pruned levels (1..2)" in capsys.readouterr().err


# ---- stability: Trainer's per-step dicts and save bars off the console; a recipe path it cannot find from here


def test_stability_console_is_quiet_and_a_relative_recipe_is_explained(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    monkeypatch.chdir(REPO)
    argv = ["run", "recipes/quickstart_digits.yaml", *tiny(out, levels=1), "controls=[]", "control_levels=null"]
    assert main(argv) == 0
    capfd.readouterr()

    monkeypatch.chdir(tmp_path)  # the run recorded recipes/quickstart_digits.yaml, relative to REPO
    assert main(["stability", str(out), "--points", "2", "--no-plot"]) == 2
    assert "the run's recipe 'recipes/quickstart_digits.yaml'" in capfd.readouterr().err

    monkeypatch.chdir(REPO)
    assert main(["stability", str(out), "--points", "2", "--no-plot"]) == 0
    console = capfd.readouterr()
    both = console.out + console.err
    assert "{'loss'" not in both and "'train_runtime'" not in both and "Writing model shards" not in both
    assert "instability" in console.out
    logs = list((out / "stability").rglob(STEP_LOG_NAME))
    assert logs, "the copies' per-step dicts go to a train_log.jsonl"
    rows = [json.loads(line) for log in logs for line in log.read_text(encoding="utf-8").splitlines()]
    assert any("loss" in r and r["arm"].endswith("copy_0") for r in rows)


# ---- the --progress bar counts each arm-level once


def test_the_run_bar_advances_once_per_arm_level(monkeypatch):
    from types import SimpleNamespace

    from hf_tickets.lottery import runner

    class Bar:
        n = 0

        def update(self, count):
            self.n += count

        def close(self):
            pass

    monkeypatch.setattr(runner, "run_bar", lambda total, initial=0: Bar())
    progress = runner.Progress(planned=3, levels=1)
    progress.reused(1, level=0)
    metrics = {"test_at_early_stop": {"accuracy": 0.9}, "remaining_weights_pct": 60.0}
    progress.trained([(SimpleNamespace(kind=kind, level=1, replicate=0), metrics) for kind in ("trunk", "reinit")])
    assert progress.bar.n == progress.done == 3


def test_the_arms_of_one_level_share_one_estimate(monkeypatch, caplog):
    """A level's arms come back together (one lockstep pass): the estimate was 1m00s, 0m38s, 0m28s on three lines
    printed at the same instant; now it is the one after the whole level."""
    from types import SimpleNamespace

    from hf_tickets.lottery import runner

    clock = iter([0.0, 10.0, 20.0])  # Progress() starts at 0; level 0 ends at 10 s, level 1 at 20 s
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock, 20.0))
    progress = runner.Progress(planned=4, levels=1)
    metrics = {"test_at_early_stop": {"accuracy": 0.9}, "remaining_weights_pct": 60.0}
    with caplog.at_level("INFO", logger="hf_tickets"):
        progress.trained([(SimpleNamespace(kind="trunk", level=0, replicate=0), metrics)])
        arms = [SimpleNamespace(kind=k, level=1, replicate=0) for k in ("trunk", "reinit", "random_prune")]
        progress.trained([(arm, metrics) for arm in arms])
    lines = [r.getMessage() for r in caplog.records if "arm-levels;" in r.getMessage()]
    assert len(lines) == 4
    assert "(1/4 arm-levels; 0m10s elapsed, about 0m30s left)" in lines[0]  # 10 s per arm-level, 3 to go
    assert all("0m20s elapsed, about 0m00s left)" in line for line in lines[1:])


# ---- inspect on a file that is not a masks file names the mistake, not damage


def test_inspect_on_a_json_or_yaml_file_is_not_called_corrupted(tmp_path, capsys):
    for name in ("metrics.json", "recipe.yaml"):
        path = tmp_path / name
        path.write_text('{"a": 1}\n', encoding="utf-8")
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is not a safetensors file" in err and "pass a masks.safetensors" in err
        assert "corrupted" not in err and "re-save" not in err


@pytest.mark.parametrize("command, required", [("run", "recipe"), ("stability", "path")])
def test_a_bare_command_names_only_what_is_required(command, required, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"the following arguments are required: {required}")  # not ", overrides"
