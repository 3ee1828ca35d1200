"""The course-report recipes (recipes/lth_course/) carry the report's protocol, and scripts/lth_course_tables.py
prints its tables from a real run: a LeNet-5 run shrunk to a few CPU steps, pruned hard enough to cut units off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_tickets import MaskSet
from hf_tickets.lottery.layout import level_dir, read_metrics
from hf_tickets.recipes import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]
COURSE_RECIPES = sorted((REPO / "recipes" / "lth_course").glob("*.yaml"))


def test_every_model_and_data_set_of_the_issue_has_a_recipe():
    assert {p.stem for p in COURSE_RECIPES} == {
        "lenet300_mnist",
        "lenet300_fashion_mnist",
        "lenet5_mnist",
        "lenet5_fashion_mnist",
        "conv6_fashion_mnist",
    }


@pytest.mark.parametrize("path", COURSE_RECIPES, ids=lambda p: p.stem)
def test_recipe_carries_the_course_protocol(path):
    recipe = load_recipe(str(path))
    sparsity, training = recipe["sparsity"], recipe["training"]
    assert (sparsity["method"], sparsity["scope"], sparsity["prune_fraction"]) == ("imp", "layerwise", 0.3)
    assert (sparsity["levels"], sparsity["rewind"]) == (16, "init")
    assert set(recipe["controls"]) == {"reinit", "random_prune"} and recipe["replicates"] >= 3
    assert recipe["model"]["weight_init"] == "kaiming_normal"
    assert (training["optim"], training["learning_rate"], training["lr_scheduler_type"]) == (
        "adamw_torch",
        0.0012,
        "constant",
    )
    assert (training["per_device_train_batch_size"], training["max_steps"], training["eval_steps"]) == (60, 40000, 917)


def test_tables_from_a_shrunk_run_count_the_units_cut_off(tmp_path):
    out = tmp_path / "lth_course" / "lenet5_mnist"
    overrides = [
        f"training.output_dir={out}",
        "training.use_cpu=true",
        "training.max_steps=2",
        "training.eval_steps=1",
        "training.logging_steps=1",
        "training.per_device_train_batch_size=8",
        "training.per_device_eval_batch_size=16",
        "data.max_train_samples=32",
        "data.max_eval_samples=16",
        "data.on_device=false",
        "replicates=2",
        "sparsity.levels=2",
        "sparsity.prune_fraction=0.9",  # 1% left at round 2: conv1 keeps 1-2 of its 150 weights
    ]
    run_recipe(load_recipe(str(REPO / "recipes" / "lth_course" / "lenet5_mnist.yaml"), overrides))
    (out.parent / "notes").mkdir()  # a folder that is not a run: skipped, and nothing is written into it
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lth_course_tables.py"), str(out.parent)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    text = result.stdout
    assert "notes: skipped, no finished level in it" in result.stderr
    assert list((out.parent / "notes").iterdir()) == []
    assert "### lenet5_mnist (2 replicates, rounds 0-2)" in text
    assert "| 2 | 1.00% |" in text and "99.16% at 49%" in text  # the round and the report's figure beside ours

    cut_rows = [line for line in text.splitlines() if line.startswith("| 2 | 1.00% | conv1 ")]
    assert len(cut_rows) == 1
    cells = [c.strip() for c in cut_rows[0].strip("|").split("|")]
    masks_0 = MaskSet.load(level_dir(str(out / "replicate_0"), 2))
    assert (
        cells[2]
        == f"conv1 {int(masks_0['conv1.weight'].sum())}/150, classifier {int(masks_0['classifier.weight'].sum())}/840"
    )
    for replicate, cell in enumerate(cells[3:]):
        folder = level_dir(str(out / f"replicate_{replicate}"), 2)
        dead = MaskSet.load(folder).dead_output_units()
        accuracy = 100 * read_metrics(folder)["test_at_early_stop"]["accuracy"]
        assert dead["conv1.weight"] >= 4  # 1-2 weights left feed at most 2 of the 6 filters
        assert cell == f"conv1 {dead['conv1.weight']}/6, classifier {dead['classifier.weight']}/10 · {accuracy:.2f}"
