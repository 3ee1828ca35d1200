"""What `hf-tickets` shows and where it sends it (issue 15): per-arm-level progress lines on the console, Trainer's
per-step dicts in the run's train_log.jsonl, threads, paths that do not exist, unreachable Hub models, a fast
--help and --version, formatted numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hf_tickets.cli import main
from hf_tickets.files import STEP_LOG_NAME

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart_digits.yaml")


def tiny(output_dir, levels: int = 2) -> list[str]:
    return [
        f"training.output_dir={output_dir}",
        "training.max_steps=4",
        "training.eval_steps=2",
        "training.logging_steps=1",
        f"sparsity.levels={levels}",
        "sparsity.rewind_step=1",
        "controls=[reinit]",
        "control_levels=[2]",
    ]


def test_step_dicts_go_to_the_log_file_and_progress_lines_to_the_console(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, *tiny(out)]) == 0
    console = capfd.readouterr()
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
