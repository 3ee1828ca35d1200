"""The one lottery runner: mixed backends on one run, one rewind-point format, replicates, produced-by records."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_tickets import MaskSet
from hf_tickets.lottery import run_controls, run_experiment
from hf_tickets.lottery.arms import masked_copy_digest
from hf_tickets.lottery.report import aggregate_replicates, percent_text, spread
from hf_tickets.lottery.rewind import load_rewind_point, optimizer_param_names
from hf_tickets.lottery.ticket import export_ticket
from hf_tickets.recipes import build_trainer, load_recipe

QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "quickstart_digits.yaml")
SMALL = (
    "training.max_steps=30",
    "training.eval_steps=10",
    "training.logging_steps=10",
    "sparsity.levels=2",
    "sparsity.rewind_step=5",
    "model.hidden_sizes=[32,16]",
    "data.max_eval_samples=100",
)


def _trainer(out, *overrides):
    return build_trainer(load_recipe(QUICKSTART, [f"training.output_dir={out}", *SMALL, *overrides]))


def _metrics(folder) -> dict:
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _level(root, level, kind=""):
    return os.path.join(str(root) + (f".{kind}" if kind else ""), f"level_{level:02d}")


def _control_record(root, kind, level):
    m = _metrics(_level(root, level, kind))
    return MaskSet.load(_level(root, level, kind)), m["identity"]


@pytest.mark.parametrize("trunk_backend, control_backend", [("lockstep", "trainer"), ("trainer", "lockstep")])
def test_mixed_backends_give_the_single_backend_runs_masks_and_start_weights(tmp_path, trunk_backend, control_backend):
    """Late rewinding (rewind="step", k=5): the controls of a trunk trained by one backend, trained by the other,
    start from the same rewind point (weights, step) with the same masks as when one backend trains everything."""
    controls = ("reinit", "random_prune")
    single, mixed = tmp_path / "single", tmp_path / "mixed"
    run_experiment(_trainer(single), controls=controls, backend=trunk_backend)
    run_experiment(_trainer(mixed), backend=trunk_backend)
    summary = run_controls(_trainer(mixed), controls, backend=control_backend)
    assert sorted(summary.trained) == sorted(f"{k}[0] level {lv}" for k in controls for lv in (1, 2))

    for level in (1, 2):  # the trunks are one backend's runs of the same experiment: bit-equal
        assert MaskSet.load(_level(single, level)) == MaskSet.load(_level(mixed, level))
    for kind in controls:
        for level in (1, 2):
            masks_single, id_single = _control_record(single, kind, level)
            masks_mixed, id_mixed = _control_record(mixed, kind, level)
            assert masks_mixed == masks_single, (kind, level)
            assert id_mixed["start_weights_sha256"] == id_single["start_weights_sha256"], (kind, level)
            assert id_mixed["start_step"] == id_single["start_step"] == (5 if kind == "random_prune" else 0)
            assert _metrics(_level(mixed, level, kind))["backend"] == control_backend
    # the random-pruning control starts from the rewind point (step k), never from theta_0 (the old silent bug)
    template = _trainer(tmp_path / "unused").model
    masks, ids = _control_record(mixed, "random_prune", 2)
    point = load_file(mixed / "rewind_point" / "model.safetensors")
    theta0 = load_file(mixed / "init_weights.safetensors")
    assert ids["start_weights_sha256"] == masked_copy_digest(template, point, dict(masks))
    assert ids["start_weights_sha256"] != masked_copy_digest(template, theta0, dict(masks))


def test_rewind_point_round_trips_between_backends(tmp_path):
    """The lockstep backend writes a Trainer checkpoint that holds what it trained; reading back gives it again."""
    trainer = _trainer(tmp_path / "run", "sparsity.levels=1")
    run_experiment(trainer, backend="lockstep", control_levels=[])  # trains level 0 (and its rewind point) ...
    import shutil

    shutil.rmtree(_level(tmp_path / "run", 1))  # ... and level 1, retrained below on the Trainer backend
    model = _trainer(tmp_path / "unused").model
    decay = set(trainer.get_decay_parameter_names(model))
    point = load_rewind_point(str(tmp_path / "run" / "rewind_point"), model, decay)
    assert point.step == 5
    saved = torch.load(tmp_path / "run" / "rewind_point" / "optimizer.pt", weights_only=True)
    names = optimizer_param_names(model, decay)
    assert [len(g["params"]) for g in saved["param_groups"]] == [len(decay), len(names) - len(decay)]
    assert saved["param_groups"][0]["weight_decay"] == trainer.args.weight_decay
    assert all(float(s["step"]) == 5 for s in saved["state"].values())
    # the schedule at step k: Trainer resumes it (constant LR here: lr unchanged, last_epoch = k)
    scheduler = torch.load(tmp_path / "run" / "rewind_point" / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == 5
    final0 = load_file(os.path.join(_level(tmp_path / "run", 0), "model.safetensors"))
    moved = [n for n in names if not torch.equal(point.weights[n], final0[n])]
    assert moved, "the rewind point holds step 5's weights, not the level's end"
    # a Trainer-backend resume from it starts at step 5 with these weights (the runner's digest check)
    run_experiment(_trainer(tmp_path / "run", "sparsity.levels=1"), backend="trainer")
    m = _metrics(_level(tmp_path / "run", 1))
    assert m["backend"] == "trainer" and m["identity"]["start_step"] == 5 and m["steps"] == 30


def test_trainer_backend_replicates_and_aggregate_report(tmp_path):
    out = tmp_path / "reps"
    summary = run_experiment(_trainer(out, "sparsity.levels=1"), controls=("reinit",), replicates=2)
    assert sorted(summary.trained) == sorted(
        [
            "trunk[0] level 0",
            "trunk[1] level 0",
            "trunk[0] level 1",
            "trunk[1] level 1",
            "reinit[0] level 1",
            "reinit[1] level 1",
        ]
    )
    init = [load_file(out / f"replicate_{r}" / "init_weights.safetensors") for r in (0, 1)]
    assert not torch.equal(init[0]["classifier.weight"], init[1]["classifier.weight"])
    for r in (0, 1):
        assert _metrics(_level(out / f"replicate_{r}", 1))["replicate"] == r
    report = summary.report
    assert report == json.load(open(out / "imp_report.json", encoding="utf-8"))
    assert report["replicates"] == 2 and report["last_run"]["trained"] == summary.trained
    scores = [_metrics(_level(out / f"replicate_{r}", 1))["test_at_early_stop"]["accuracy"] for r in (0, 1)]
    assert report["levels"][1]["ticket"]["mean"] == pytest.approx(np.mean(scores))
    assert report["levels"][1]["ticket"]["std"] == pytest.approx(np.std(scores, ddof=1))
    assert os.path.isfile(out / "imp_accuracy.png")


def test_percent_text_shows_the_spread_only_over_several_replicates():
    assert percent_text(spread([0.9, 0.8])) == "85.00 ± 7.07"
    assert percent_text(spread([0.9123])) == "91.23"
    assert percent_text(None) == ""


def test_aggregate_is_mean_and_spread_by_hand():
    def rows(level_scores, kind=None):
        out = []
        for level, acc in level_scores:
            row = {"level": level, "remaining_weights_pct": 100 * 0.8**level, "test_at_early_stop": {"accuracy": acc}}
            if kind:
                row["trunk_level"] = level
            out.append(row)
        return out

    reports = [
        {"scored_by": "test", "trunk": rows([(0, 0.90), (1, 0.91)]), "controls": {"reinit": rows([(1, 0.80)], True)}},
        {"scored_by": "test", "trunk": rows([(0, 0.92), (1, 0.87)]), "controls": {"reinit": rows([(1, 0.70)], True)}},
        {"scored_by": "test", "trunk": rows([(0, 0.94), (1, 0.89)]), "controls": {"reinit": rows([(1, 0.75)], True)}},
    ]
    agg = aggregate_replicates(reports, tolerance=0.03)
    level1 = agg["levels"][1]
    assert level1["ticket"]["mean"] == pytest.approx(0.89)  # (0.91 + 0.87 + 0.89) / 3
    assert level1["ticket"]["std"] == pytest.approx(0.02)  # sqrt((0.02² + 0.02² + 0) / 2)
    assert (level1["ticket"]["min"], level1["ticket"]["max"], level1["ticket"]["n"]) == (0.87, 0.91, 3)
    assert level1["reinit"]["mean"] == pytest.approx(0.75) and level1["reinit"]["std"] == pytest.approx(0.05)
    assert agg["dense_accuracy"] == pytest.approx(0.92) and agg["winning_ticket_levels"] == [1]  # 0.89 >= 0.92-0.03
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def test_levels_record_the_command_that_produced_them(tmp_path):
    out = tmp_path / "run"
    run_experiment(_trainer(out, "sparsity.levels=1"), command="hf-tickets run first.yaml")
    assert _metrics(_level(out, 1))["produced_by"] == "hf-tickets run first.yaml"
    again = run_experiment(_trainer(out, "sparsity.levels=1"), command="hf-tickets run second.yaml")
    assert again.trained == [] and again.reused == ["trunk[0] level 0", "trunk[0] level 1"]
    ticket = export_ticket(str(out), command="hf-tickets run second.yaml")
    card = open(os.path.join(ticket, "README.md"), encoding="utf-8").read()
    assert "hf-tickets run first.yaml" in card and "second.yaml" not in card


def test_saved_vit_weights_load_by_the_models_own_names(tmp_path):
    """transformers 5 saves ViT under its original checkpoint names; a plain load_state_dict(strict=False) (what
    Trainer's resume does) loads none of the encoder. The runner reads level folders and rewind points by name."""
    from transformers import ViTConfig, ViTForImageClassification

    from hf_tickets.checkpoints import load_saved_weights

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )
    torch.manual_seed(0)
    saved = ViTForImageClassification(config)
    saved.save_pretrained(tmp_path)
    torch.manual_seed(1)
    other = ViTForImageClassification(config)
    raw = load_file(tmp_path / "model.safetensors")
    assert other.load_state_dict(raw, strict=False).missing_keys, "the file no longer uses other names: simplify"
    weights = load_saved_weights(str(tmp_path), other)
    assert set(weights) == set(saved.state_dict())
    for name, tensor in saved.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    with pytest.raises(ValueError, match="does not have"):
        load_saved_weights(str(tmp_path / "model.safetensors"), torch.nn.Linear(2, 2))


def test_progress_lines_say_level_arm_accuracy_and_what_is_left(tmp_path, caplog):
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="hf_tickets.lottery.runner"):
        run_experiment(_trainer(out), controls=("reinit",))
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_tickets.lottery.runner"]
    progress = [line for line in lines if "arm-levels" in line]
    assert len(progress) == 5  # trunk at levels 0-2, reinit at 1-2
    assert progress[0].startswith("level 0/2 trunk[0]: accuracy ") and "(1/5 arm-levels;" in progress[0]
    assert progress[-1].startswith("level 2/2 reinit[0]: accuracy ") and "(5/5 arm-levels;" in progress[-1]
    assert all("elapsed, about" in line and "left)" in line for line in progress)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_tickets.lottery.runner"):
        run_experiment(_trainer(out), controls=("reinit",))
    again = [r.getMessage() for r in caplog.records if r.name == "hf_tickets.lottery.runner"]
    assert "level 0/2: 1 arm(s) reused from an earlier run with the same identity" in again
    assert not [line for line in again if "arm-levels" in line]
