"""What `hf-tickets` shows and where it sends it (issue 15): per-arm-level progress lines on the console, Trainer's
per-step dicts in the run's train_log.jsonl, threads, paths that do not exist, unreachable Hub models, a fast
--help and --version, formatted numbers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_overrides import tiny  # tests/ is on sys.path (pytest rootdir-relative import)

from hf_tickets.cli import main
from hf_tickets.files import STEP_LOG_NAME

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart_digits.yaml")


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that changes it."""
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


def test_step_dicts_go_to_the_log_file_and_progress_lines_to_the_console(tmp_path, capfd, monkeypatch, torch_threads):
    out = tmp_path / "run"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # unset: the CLI picks the small-model thread count
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch_threads.set_num_threads(2)
    assert main(["run", QUICKSTART, *tiny(out)]) == 0
    assert torch_threads.get_num_threads() == 1
    console = capfd.readouterr()
    assert console.err.count("using 1 CPU thread (torch's default here: 2") == 1  # said once
    both = console.out + console.err
    # one progress line per finished arm-level: level i/N, arm and replicate, arm-levels done of planned
    for line in ("level 0/2 trunk[0]", "level 1/2 trunk[0]", "level 2/2 trunk[0]", "level 2/2 reinit[0]"):
        assert line in console.err, line
    assert "(4/4 arm-levels;" in console.err and "left)" in console.err
    # Trainer's per-step dicts and bars are not on the console ...
    assert "{'loss'" not in both and "'train_runtime'" not in both
    assert "Writing model shards" not in both
    # ... they are in the run folder's log file, one JSON object a line, for every arm-level and step
    rows = [json.loads(line) for line in (out / STEP_LOG_NAME).read_text(encoding="utf-8").splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert {r["arm"] for r in losses} == {
        os.path.join("run", "level_00"),
        os.path.join("run", "level_01"),
        os.path.join("run", "level_02"),
        os.path.join("run.reinit", "level_02"),
    }
    steps = {
        a: sorted(r["step"] for r in losses if r["arm"] == os.path.join("run", a)) for a in ("level_00", "level_01")
    }
    assert steps == {"level_00": [1, 2, 3, 4], "level_01": [2, 3, 4]}  # pruned levels rewind to step 1
    assert any("eval_test_accuracy" in r for r in rows) and any("train_runtime" in r for r in rows)


def test_log_steps_puts_the_step_dicts_back_on_the_console(tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["run", QUICKSTART, *tiny(out, levels=1), "controls=[]", "control_levels=null", "--log-steps"]
    assert main(argv) == 0
    console = capfd.readouterr()
    assert "'loss'" in console.out + console.err
    assert (out / STEP_LOG_NAME).is_file()  # written either way


def test_run_bar_only_when_asked_for_and_on_a_terminal(monkeypatch):
    from hf_tickets import run_log

    monkeypatch.setattr(run_log, "_OPTIONS", run_log.ConsoleOptions())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert run_log.run_bar(5) is None  # not asked for
    run_log.set_console(progress_bar=True)
    bar = run_log.run_bar(5)
    assert bar is not None and bar.total == 5
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert run_log.run_bar(5) is None  # a log file or CI: no bar


# ---- threads: picked only when the user set none


def test_threads_are_picked_only_when_unset(torch_threads):
    from hf_tickets.cpu_threads import SMALL_MODEL_THREADS, pick_cpu_threads

    torch_threads.set_num_threads(2)
    assert pick_cpu_threads({"OMP_NUM_THREADS": "2"}) is None and torch_threads.get_num_threads() == 2
    assert pick_cpu_threads({"MKL_NUM_THREADS": "3"}) is None and torch_threads.get_num_threads() == 2
    line = pick_cpu_threads({})
    assert torch_threads.get_num_threads() == SMALL_MODEL_THREADS
    assert line.startswith(f"using {SMALL_MODEL_THREADS} CPU thread") and "OMP_NUM_THREADS" in line
    assert pick_cpu_threads({}) is None  # already there: nothing to say


# ---- paths: a missing local path is a missing folder (exit 2), never a Hub request; wrong-kind folders are refused


@pytest.fixture
def closed_endpoint(monkeypatch):
    """The Hub endpoint is a local port nobody listens on; offline mode off, so the probe really runs."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "argv",
    [["inspect", "runs/nope"], ["inspect", "runs/a/b"], ["report", "runs/does_not_exist"], ["card", "./nope"]],
)
def test_missing_local_paths_are_missing_folders(argv, tmp_path, monkeypatch, closed_endpoint, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 2  # no Hub request, no retries
    err = capsys.readouterr().err
    assert f"{argv[1]}: missing folder" in err and "Traceback" not in err
    assert listing(tmp_path) == ["runs"]


def test_wrong_kind_folders_are_refused_and_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "level_00").mkdir(parents=True)  # a run root: no masks of its own, not a checkpoint
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    before = listing(tmp_path)
    assert main(["inspect", str(run)]) == 2
    assert "is not a sparse checkpoint folder (no masks.safetensors in it)" in capsys.readouterr().err
    assert main(["card", str(run)]) == 2
    assert "nothing was written there" in capsys.readouterr().err
    assert main(["report", str(run / "notes.txt")]) == 2
    assert "is a file, not a lottery run folder" in capsys.readouterr().err
    assert listing(tmp_path) == before


# ---- an unreachable Hub fails fast with the fix


def test_unreachable_hub_repo_fails_fast_naming_the_fix(closed_endpoint, capsys):
    started = time.monotonic()
    assert main(["inspect", "someone/not-a-cached-repo"]) == 1
    assert time.monotonic() - started < 5  # one probe, no 30 s retry loop
    err = capsys.readouterr().err
    assert "cannot load 'someone/not-a-cached-repo' from the Hugging Face Hub" in err
    assert f"127.0.0.1:{closed_endpoint} unreachable" in err and "HF_HUB_OFFLINE" in err and "local folder" in err


def test_recipe_hub_model_without_fallback_fails_before_training(closed_endpoint, tmp_path, capsys):
    recipe = str(REPO / "recipes" / "bert_rotten_tomatoes.yaml")
    argv = ["run", recipe, "model.pretrained=someone/not-a-cached-bert", "model.offline_fallback=null"]
    started = time.monotonic()
    assert main([*argv, f"training.output_dir={tmp_path / 'run'}"]) == 1
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "model.offline_fallback" in err and "local folder" in err
    assert not (tmp_path / "run").exists()


def test_offline_mode_and_an_uncached_model_fail_at_once(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "someone/not-a-cached-repo"]) == 1
    assert "HF offline mode is set" in capsys.readouterr().err


# ---- a fast --help: the package import is lazy; --version


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )


def test_cli_import_pulls_in_neither_the_trainer_nor_torch():
    code = (
        "import sys, hf_tickets.cli\n"
        "print(sorted(m for m in ('torch', 'transformers', 'transformers.trainer') if m in sys.modules))"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_version_are_fast(capsys):
    code = (
        "import time; t = time.perf_counter()\n"
        "from hf_tickets.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('SECONDS', time.perf_counter() - t)"
    )
    result = python(code)
    assert "usage: hf-tickets" in result.stdout and "run" in result.stdout
    assert float(result.stdout.split("SECONDS")[-1]) < 1.5
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from hf_tickets import __version__

    assert capsys.readouterr().out.strip() == f"hf-tickets {__version__}"


def test_lazy_package_still_registers_models_and_methods():
    """`import hf_tickets` registers the reference CNNs once transformers' Auto classes load (no explicit import of
    hf_tickets.models), and a SparsityConfig reached through hf_tickets.config knows the built-in methods."""
    code = (
        "import sys, hf_tickets\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('lenet_300_100')).__name__)\n"
        "from hf_tickets.config import SparsityConfig\n"
        "print(SparsityConfig(method='imp', prune_fraction=0.2, levels=1).method)\n"
        "print(hf_tickets.TicketTrainer.__name__, 'hf_tickets.trainer' in sys.modules)"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LeNet300100Config", "imp", "TicketTrainer", "True"]
