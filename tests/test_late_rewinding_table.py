"""scripts/late_rewinding_table.py puts runs that differ only in the rewind step k side by side (issue 19, part 2),
checked on two quickstart runs (k = 0 and k = 5, random-pruning control) against their level folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_tickets.lottery.layout import level_dir, read_metrics
from hf_tickets.recipes import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "late_rewinding_table.py"
SMALL = [
    "training.max_steps=30",
    "training.eval_steps=10",
    "training.logging_steps=10",
    "sparsity.levels=2",
    "controls=[random_prune]",
    "data.max_eval_samples=100",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("late_rewinding")
    rewinds = {0: ["sparsity.rewind=init", "sparsity.rewind_step=null"], 5: ["sparsity.rewind_step=5"]}
    out = {}
    for k, rewind in rewinds.items():
        out[k] = root / f"k{k}"
        overrides = [f"training.output_dir={out[k]}", *SMALL, *rewind]
        run_recipe(load_recipe(str(REPO / "recipes" / "quickstart_digits.yaml"), overrides))
    return out


def _table(*folders) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, folders)], capture_output=True, text=True, cwd=REPO)


def test_columns_follow_k_and_hold_each_runs_accuracy(runs):
    result = _table(runs[5], runs[0])  # given out of order: columns still go k = 0, then k = 5
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| level | remaining | k=0 ticket | k=0 random pruning | k=5 ticket | k=5 random pruning |"
    for level in (1, 2):
        row = next(line for line in lines if line.startswith(f"| {level} | "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        for i, k in enumerate((0, 5)):
            ticket = read_metrics(level_dir(str(runs[k]), level))
            control = read_metrics(level_dir(f"{runs[k]}.random_prune", level))
            assert ticket["rewind_step_k"] == k
            assert cells[2 + 2 * i] == f"{100 * ticket['test_at_early_stop']['accuracy']:.2f}"
            assert cells[3 + 2 * i] == f"{100 * control['test_at_early_stop']['accuracy']:.2f}"
    start = lines.index(next(line for line in lines if line.startswith("| k | dense |")))
    summary = lines[start + 2 : start + 4]
    assert [line.split("|")[1].strip() for line in summary] == ["0", "5"]
    assert all("(level " in line and "at level 2" in line for line in summary)


def test_two_runs_at_one_k_or_a_missing_folder_are_refused(runs, tmp_path):
    same = _table(runs[0], runs[0])
    assert same.returncode != 0 and "share a rewind step" in same.stderr
    missing = _table(runs[0], tmp_path / "nope")
    assert missing.returncode != 0 and "not a folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _table(runs[0], tmp_path / "empty")
    assert empty.returncode != 0 and "not a run folder" in empty.stderr
    assert list((tmp_path / "empty").iterdir()) == [], "nothing is written into a folder that is not a run"
