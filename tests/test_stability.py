"""Linear mode connectivity (hf_tickets.stability): two copies from one rewind point, the error along their path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import DictDataset, make_cnn, make_dataset, training_args
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from hf_tickets import MaskSet
from hf_tickets.cli import main
from hf_tickets.lottery import run_experiment
from hf_tickets.lottery.metrics import accuracy
from hf_tickets.recipes import build_trainer, load_recipe
from hf_tickets.stability import (
    RESULT_NAME,
    SWEEP_NAME,
    check_rewind_point,
    instability,
    instability_sweep,
    interpolate_weights,
    make_rewind_points,
    recompute_batchnorm_,
)

QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "quickstart_digits.yaml")
# LeNet-300-100 shrunk to 32-16 on the digits set: level 0 (30 steps, rewind point at step 5) and one pruned level
SMALL = (
    "training.max_steps=30",
    "training.eval_steps=10",
    "training.logging_steps=10",
    "sparsity.levels=1",
    "sparsity.rewind_step=5",
    "model.hidden_sizes=[32,16]",
    "data.max_eval_samples=100",
)


def _trainer(out):
    return build_trainer(load_recipe(QUICKSTART, [f"training.output_dir={out}", *SMALL]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An IMP run (trainer backend, late rewinding to step 5) and a trainer built from its recipe."""
    root = tmp_path_factory.mktemp("stability")
    run_experiment(_trainer(root / "run"))
    return root / "run", _trainer(root / "scratch")


@pytest.fixture(scope="module")
def masked(run, tmp_path_factory):
    """The level-1 subnetwork from the rewind point, two data orders, the default 30 points."""
    run_dir, trainer = run
    out = tmp_path_factory.mktemp("masked")
    result = instability(
        trainer, str(run_dir / "rewind_point"), str(out), masks=str(run_dir / "level_01"), max_steps=15
    )
    return result, out, MaskSet.load(str(run_dir / "level_01"))


def test_identical_data_orders_give_zero_instability(run, tmp_path):
    run_dir, trainer = run
    result = instability(
        trainer, str(run_dir / "rewind_point"), str(tmp_path), data_seeds=(7, 7), points=5, max_steps=12, plot=False
    )
    first, second = (load_file(os.path.join(c, "model.safetensors")) for c in result.copies)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert abs(result.instability) <= 1e-6 and abs(result.loss_instability) <= 1e-6
    assert max(result.loss) - min(result.loss) <= 1e-6
    assert (result.start_step, result.end_step, result.schedule_steps) == (5, 12, 30)


def test_different_orders_give_a_curve_and_nonnegative_instability(masked):
    result, out, _ = masked
    first, second = (load_file(os.path.join(c, "model.safetensors")) for c in result.copies)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the data order did change training
    assert len(result.alphas) == len(result.error) == len(result.loss) == 30
    assert result.alphas[0] == 0.0 and result.alphas[-1] == 1.0
    assert result.instability >= 0
    assert result.instability == pytest.approx(max(result.error) - (result.error[0] + result.error[-1]) / 2)
    assert result.batchnorm == "interpolate" and result.eval_split == "test" and result.eval_examples == 100
    assert result.sparsity > 0.15
    with open(out / RESULT_NAME, encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(result.to_dict()))
    assert (out / "stability.png").stat().st_size > 0
    assert not (out / "copy_0" / "training_args.bin").exists()


def test_path_endpoints_are_the_trained_copies_errors(masked, run):
    result, _, _ = masked
    _, trainer = run
    for copy_dir, error, loss in zip(
        result.copies, (result.error[0], result.error[-1]), (result.loss[0], result.loss[-1])
    ):
        model = type(trainer.model).from_pretrained(copy_dir)
        args = training_args(os.path.join(copy_dir, "eval"), per_device_eval_batch_size=16)
        judge = Trainer(model=model, args=args, data_collator=trainer.data_collator, compute_metrics=accuracy)
        metrics = judge.evaluate(eval_dataset=trainer.eval_dataset["test"])
        assert 1 - metrics["eval_accuracy"] == pytest.approx(error, abs=1e-9)
        assert metrics["eval_loss"] == pytest.approx(loss, abs=1e-5)


def test_masked_weights_stay_zero_along_the_path(masked):
    result, _, masks = masked
    first, second = (load_file(os.path.join(c, "model.safetensors")) for c in result.copies)
    for alpha in result.alphas:
        weights = interpolate_weights(first, second, alpha, masks)
        for name, mask in masks.items():
            assert not weights[name][~mask].any(), (alpha, name)
    # the path writes zeros even where endpoints are not zero (a stray value cannot leak into the path)
    noisy = {k: v + 1.0 for k, v in first.items()}
    for name, mask in masks.items():
        assert not interpolate_weights(noisy, noisy, 0.3, masks)[name][~mask].any()


def test_interpolation_is_exact_at_the_endpoints_and_linear_between():
    a = {"w": torch.randn(4, 3), "n": torch.tensor(3)}
    b = {"w": torch.randn(4, 3), "n": torch.tensor(9)}
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_weights(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate_weights(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert interpolate_weights(a, b, 0.5)["n"].item() == 3  # integer buffers are not interpolated


def test_batchnorm_statistics_are_recomputed_from_training_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(5.0)
    batches = [torch.randn(8, 3) * 2 + 1 for _ in range(4)]

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    recompute_batchnorm_(Wrapped(), [{"x": b} for b in batches])
    assert torch.allclose(model[0].running_mean, torch.cat(batches).mean(0), atol=1e-6)
    assert not model.training or model[0].momentum is not None  # update_bn restores the module's state


def test_batchnorm_model_recomputes_by_default(tmp_path):
    """A CNN with BatchNorm: rewind point made by replaying its training, statistics recomputed at every point."""
    train = make_dataset("cnn", n=32)
    evals = DictDataset([make_dataset("cnn", n=16, seed=1)[i] for i in range(16)])
    args = training_args(tmp_path / "cnn", max_steps=6, per_device_train_batch_size=8)
    trainer = Trainer(model=make_cnn(), args=args, train_dataset=train, eval_dataset=evals)
    points = make_rewind_points(trainer, [0, 2], str(tmp_path / "points"))
    assert [check_rewind_point(points[k]) for k in (0, 2)] == [0, 2]
    result = instability(trainer, points[0], str(tmp_path / "out"), points=3, max_steps=2, bn_batches=2, plot=False)
    assert result.batchnorm == "recompute" and result.bn_batches == 2 and result.start_step == 0
    assert result.eval_split is None and len(result.error) == 3


def test_replayed_rewind_point_is_the_runs_own(run, tmp_path):
    """make_rewind_points replays level 0 from theta_0: at the run's k it gives the run's rewind point exactly."""
    run_dir, trainer = run
    points = make_rewind_points(
        trainer,
        [5],
        str(tmp_path),
        init_weights=str(run_dir / "init_weights.safetensors"),
        masks=MaskSet.load(str(run_dir / "level_00")),
    )
    ours, theirs = (load_file(os.path.join(p, "model.safetensors")) for p in (points[5], run_dir / "rewind_point"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    opt_ours, opt_theirs = (
        torch.load(os.path.join(p, "optimizer.pt"), weights_only=True) for p in (points[5], run_dir / "rewind_point")
    )
    for index, state in opt_theirs["state"].items():
        assert torch.equal(opt_ours["state"][index]["exp_avg"], state["exp_avg"])


def test_sweep_over_rewind_steps(run, tmp_path):
    run_dir, trainer = run
    sweep = instability_sweep(trainer, str(run_dir), str(tmp_path), steps=[0, 5], points=3, max_steps=10, plot=False)
    assert [row["k"] for row in sweep["steps"]] == [0, 5]
    assert sweep["level"] == 1 and sweep["run_rewind_step"] == 5
    assert all(row["instability"] >= 0 for row in sweep["steps"])
    assert os.path.isdir(tmp_path / "rewind_points" / "step_000000")
    assert not os.path.exists(tmp_path / "rewind_points" / "step_000005")  # the run's own point serves k = 5
    with open(tmp_path / SWEEP_NAME, encoding="utf-8") as fh:
        assert json.load(fh)["steps"][1]["k"] == 5
    for k in (0, 5):
        with open(tmp_path / f"k_{k:06d}" / RESULT_NAME, encoding="utf-8") as fh:
            assert json.load(fh)["start_step"] == k


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"points": 1}, "points must be an int >= 2"),
        ({"points": 2.5}, "points must be an int >= 2"),
        ({"data_seeds": (1,)}, "data_seeds must be two ints"),
        ({"data_seeds": (0, 1)}, "closer than the"),
        ({"max_steps": 5}, "must train past the rewind point's step 5"),
        ({"max_steps": 31}, "at most to the end of its schedule"),
        ({"batchnorm": "never"}, "batchnorm='never' is unknown"),
        ({"eval_split": "train"}, "eval split 'train' is not one of"),
    ],
)
def test_bad_arguments_fail_before_training(run, tmp_path, kwargs, match):
    run_dir, trainer = run
    with pytest.raises(ValueError, match=match):
        instability(trainer, str(run_dir / "rewind_point"), str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_rewind_point_is_refused(run, tmp_path):
    run_dir, trainer = run
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(
        (run_dir / "rewind_point" / "model.safetensors").read_bytes()
    )
    for folder in (tmp_path / "half", tmp_path / "missing", run_dir / "level_01"):
        with pytest.raises(ValueError, match="not a rewind point|is not a folder"):
            instability(trainer, str(folder), str(tmp_path / "out"))


def test_cli_table_and_exit_codes(run, tmp_path, capsys):
    run_dir, _ = run
    point = str(run_dir / "rewind_point")
    base = [*SMALL, "--recipe", QUICKSTART]
    out = tmp_path / "cli"
    assert main(["stability", point, *base, "--points", "3", "--max-steps", "8", "--no-plot", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "two copies from step 5 to 8" in printed and "instability" in printed
    assert printed.count("\n 0.500 ") == 1
    assert (out / RESULT_NAME).is_file()
    assert main(["stability", str(tmp_path), *base]) == 2
    assert "is not a rewind point" in capsys.readouterr().err
    assert main(["stability", point, *base, "--points", "1"]) == 2
    assert "points must be an int >= 2" in capsys.readouterr().err
    assert main(["stability", point, *base, "--steps", "0"]) == 2
    assert "apply to an IMP run folder" in capsys.readouterr().err
    # the run was made by pytest, not `hf-tickets run`: without --recipe the CLI says what to pass
    assert main(["stability", point, "--points", "3"]) == 2
    assert "pass --recipe" in capsys.readouterr().err
