"""The `hf-tickets` command: run, inspect, report, card, bad input, and the `python -m hf_tickets.cli` entry point
that `accelerate launch -m hf_tickets.cli` uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_tickets.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart_digits.yaml")


def shrink(output_dir) -> list[str]:
    return [
        f"training.output_dir={output_dir}",
        "training.max_steps=4",
        "training.eval_steps=2",
        "training.logging_steps=2",
        "sparsity.levels=1",
        "sparsity.rewind_step=1",
        "controls=[]",
    ]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["run", QUICKSTART, *shrink(out)])
    assert code == 0
    return out


def test_run(cli_run, capsys):
    ticket = cli_run / "ticket"
    for file in ("masks.safetensors", "README.md", "model.safetensors"):
        assert (ticket / file).is_file()
    assert (cli_run / "level_01" / "masks.safetensors").is_file()
    card = (ticket / "README.md").read_text(encoding="utf-8")
    assert "hf-tickets run" in card and "sparsity.levels=1" in card  # the card records the exact command


def test_run_prints_the_level_table(tmp_path, capsys):
    assert main(["run", "quickstart_digits", *shrink(tmp_path / "run")]) == 0  # a name under recipes/ works too
    out = capsys.readouterr().out
    assert "remaining %" in out and "winning-ticket levels" in out
    assert f"ticket: {tmp_path / 'run' / 'ticket'}" in out


def test_inspect(cli_run, capsys):
    assert main(["inspect", str(cli_run / "ticket")]) == 0
    out = capsys.readouterr().out
    assert "masked tensors, sparsity" in out
    assert "hidden.0.weight" in out and "classifier.weight" in out


def test_inspect_json(cli_run, capsys):
    assert main(["inspect", str(cli_run / "ticket" / "masks.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["sparsity"] < 1
    assert set(report["layers"]) == {"hidden.0.weight", "hidden.1.weight", "classifier.weight"}
    assert report["metadata"]["method"] == "imp"


def test_report(cli_run, capsys):
    (cli_run / "imp_report.json").unlink()
    assert main(["report", str(cli_run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"dense_accuracy", "winning_ticket_levels", "rewind_vs_reinit_gap"}
    assert (cli_run / "imp_report.json").is_file()


def test_report_refuses_folders_that_are_not_runs(cli_run, tmp_path, capsys):
    for path in (cli_run / "ticket", tmp_path / "does_not_exist"):
        assert main(["report", str(path)]) == 2
        assert "not a lottery run folder" in capsys.readouterr().err
    assert not (cli_run / "ticket" / "imp_report.json").exists(), "report wrote into a folder of the wrong kind"


def test_rerun_says_what_it_reused_and_replicates_print_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", QUICKSTART, *shrink(out), "replicates=2", "controls=[reinit]"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "trained 6 arm-levels" in first and "reused 6" not in first
    assert "ticket (mean ± std)" in first and "reinit (mean ± std)" in first and "(n=2)" in first
    assert (out / "replicate_1" / "ticket" / "README.md").is_file()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "trained 0 arm-levels" in again and "reused 6 finished arm-levels" in again


def test_card(cli_run, capsys):
    level = cli_run / "level_01"
    (level / "README.md").unlink()
    assert main(["card", str(level)]) == 0
    assert capsys.readouterr().out.strip().endswith("README.md")
    assert "sparsity" in (level / "README.md").read_text(encoding="utf-8").lower()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "recipes/no_such_recipe.yaml"], "not found"),
        (["run", QUICKSTART, "training.max_steps"], "section.key=value"),
        (["run", QUICKSTART, "trainig.max_steps=2"], "names no recipe section"),
        (["run", QUICKSTART, "training.max_stepz=2"], "section 'training'"),
        (["run", QUICKSTART, "sparsity.prune_fraction=1.5"], "prune_fraction"),
        (["inspect", "/no/such/folder"], "hf-tickets: error"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-tickets: error:") and message in err


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: hf-tickets" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """`python -m hf_tickets.cli run ...`: the module `accelerate launch -m hf_tickets.cli` starts on every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "hf_tickets.cli", "run", QUICKSTART, *shrink(tmp_path / "run")],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ticket: {tmp_path / 'run' / 'ticket'}" in result.stdout
    assert (tmp_path / "run" / "ticket" / "masks.safetensors").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "hf_tickets.cli", "run", "recipes/no_such_recipe.yaml"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "not found" in bad.stderr


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    """The README's `accelerate launch -m hf_tickets.cli run RECIPE` line, one CPU process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    result = subprocess.run(
        [*launch, "-m", "hf_tickets.cli", "run", QUICKSTART, *shrink(tmp_path / "run")],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "ticket" / "masks.safetensors").is_file()
