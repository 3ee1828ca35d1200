"""BatchNorm in the lockstep backend: per-arm running statistics, checked against `TicketTrainer` on the same batches.

A tiny CIFAR ResNet (depth 8, width 4, BatchNorm after every conv, projection shortcuts) on scikit-learn's digits.
The reference is `TicketTrainer` itself, with its sampler's batch order recorded and replayed through the lockstep
engine, so both train on exactly the same batches: every weight AND every running statistic (running_mean,
running_var, num_batches_tracked) must agree to float32 tolerance, per arm, with two arms of different masks trained
in one pass. The rest: late-joining arms and rewind points carry the running statistics, the CUDA-graph warm-up is
undone on them, and a lockstep level's saved checkpoint holds the same tensors a Trainer-backend level holds.
CPU; the whole file runs in well under a minute.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import training_args
from safetensors.torch import load_file

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer
from hf_tickets.allocation import random_masks_like
from hf_tickets.data import TensorImageDataset, load_splits
from hf_tickets.lottery import LotteryRunner
from hf_tickets.lottery.batched import BatchedMaskedTraining, running_stat_names
from hf_tickets.lottery.layout import REWIND_DIR, control_dir, level_dir
from hf_tickets.lottery.lockstep import (
    ArmStart,
    SplitTensors,
    TrainPlan,
    batch_tables,
    plan_from_training_args,
    train_lockstep,
)
from hf_tickets.lottery.rewind import load_rewind_point
from hf_tickets.models import CifarResNetConfig, CifarResNetForImageClassification
from hf_tickets.recipes import accuracy

TINY_RESNET = {"depth": 8, "width": 4, "image_size": 8, "num_channels": 1, "num_labels": 10}
RTOL, ATOL = 1e-5, 1e-5
STEPS = 25


def _resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CifarResNetForImageClassification(CifarResNetConfig(**TINY_RESNET))


def _conv_masks(model: torch.nn.Module, density: float, seed: int) -> MaskSet:
    """Random masks on every conv and the classifier weight (BatchNorm and biases dense)."""
    g = torch.Generator().manual_seed(seed)
    return MaskSet(
        {
            n: torch.rand(p.shape, generator=g) < density
            for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() > 1
        }
    )


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ {sorted(set(got) ^ set(want))[:5]}"
    for name in want:
        message = f"{what}: {name} differs"
        torch.testing.assert_close(
            got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m, head=message: f"{head}: {m}"
        )


@pytest.fixture(scope="module")
def digits():
    return load_splits("sklearn/digits", seed=0)


class _RecordingDataset(TensorImageDataset):
    """Records the batch indices Trainer's sampler hands out, so the lockstep engine can replay them."""

    def __init__(self, pixel_values, labels):
        super().__init__(pixel_values, labels)
        self.batches: list[list[int]] = []

    def __getitems__(self, indices):
        self.batches.append([int(i) for i in indices])
        return super().__getitems__(indices)


def test_running_stat_names_and_momentum_none_is_refused():
    model = _resnet(0)
    names = running_stat_names(model)
    assert "bn.running_mean" in names and "blocks.1.shortcut.1.num_batches_tracked" in names
    assert len(names) == 3 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    cumulative = _resnet(0)
    cumulative.bn.momentum = None
    with pytest.raises(NotImplementedError, match="momentum=None"):
        BatchedMaskedTraining([cumulative, _resnet(1)], [None, None])


def _norm_net(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "batchnorm1d":
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 10)
        )
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 10),
    )


@pytest.mark.parametrize("kind", ["batchnorm1d", "instancenorm2d"])
@pytest.mark.parametrize("per_arm", [False, True])
def test_each_arm_updates_its_own_running_statistics(digits, kind, per_arm):
    """One step: every arm's running statistics are what its own module computes in training mode on its batch."""
    models = [_norm_net(kind, seed) for seed in (0, 1)]
    batched = BatchedMaskedTraining(models, [None, None], lr=0.1)
    x, y = digits["train"].pixel_values[:64], digits["train"].labels[:64]
    batches = [(x[:32], y[:32]), (x[32:], y[32:])] if per_arm else [(x[:32], y[:32])] * 2
    if per_arm:
        batched.step(torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]), per_arm=True)
    else:
        batched.step(*batches[0])
    for i, (model, (xb, _)) in enumerate(zip(models, batches)):
        model.train()
        with torch.no_grad():
            model(xb)
        state, names = batched.state_dict(i), running_stat_names(model)
        assert len(names) == 3
        for name in names:
            torch.testing.assert_close(state[name], model.state_dict()[name], rtol=1e-6, atol=1e-7)
        initial = _norm_net(kind, i).state_dict()
        assert not torch.equal(state[names[0]], initial[names[0]]), "the running mean never moved"


def test_two_masked_arms_in_one_pass_equal_two_ticket_trainer_runs(tmp_path, digits):
    """Same batches: each arm ends with its TicketTrainer run's weights and running statistics, and evaluates with
    its own running statistics (eval loss and accuracy as the trained model computes them in eval mode)."""
    theta0 = _resnet(0).state_dict()
    masks = [_conv_masks(_resnet(0), 0.5, seed=1), _conv_masks(_resnet(0), 0.3, seed=2)]
    trained, tables = [], []
    for i, mask in enumerate(masks):
        train = _RecordingDataset(digits["train"].pixel_values, digits["train"].labels)
        model = _resnet(0)
        args = training_args(
            str(tmp_path / f"arm{i}"),
            max_steps=STEPS,
            per_device_train_batch_size=32,
            optim="sgd",
            optim_args="momentum=0.9",
            learning_rate=0.05,
            lr_scheduler_type="cosine",
            weight_decay=1e-4,
            max_grad_norm=1.0,
            dataloader_drop_last=True,
        )
        trainer = TicketTrainer(
            model=model, args=args, train_dataset=train, data_collator=TensorImageDataset.collate, masks=mask
        )
        trainer.train()
        trained.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        tables.append(torch.tensor(train.batches[:STEPS]))
        plan = plan_from_training_args(args, model, len(train), set(trainer.get_decay_parameter_names(model)))
    assert torch.equal(tables[0], tables[1]), "both Trainer runs must see one batch order (same seed)"
    assert plan.optimizer == "sgd" and plan.momentum == 0.9 and plan.total_steps == STEPS

    val = digits["validation"]
    evals = {"validation": SplitTensors(val.pixel_values, val.labels)}
    train_split = SplitTensors(digits["train"].pixel_values, digits["train"].labels)
    arms = [ArmStart(theta0, dict(mask)) for mask in masks]
    results = train_lockstep(_resnet(0), arms, plan, train_split, evals, tables[0].unsqueeze(0))

    for i, (result, want) in enumerate(zip(results, trained)):
        _close(result.weights, want, f"arm {i}")
        assert int(result.weights["bn.num_batches_tracked"]) == STEPS
        assert not torch.allclose(result.weights["bn.running_var"], theta0["bn.running_var"]), "stats never moved"
        # eval mode: the arm's own running statistics, as the Trainer-trained model in eval mode computes
        model = _resnet(0)
        model.load_state_dict(want)
        model.eval()
        with torch.no_grad():
            logits = model(val.pixel_values).logits
        final = result.history[-1]["validation"]
        assert final["loss"] == pytest.approx(float(F.cross_entropy(logits, val.labels)), rel=1e-4)
        assert final["accuracy"] == pytest.approx(float((logits.argmax(-1) == val.labels).double().mean()))
    gap = (results[0].weights["bn.running_mean"] - results[1].weights["bn.running_mean"]).abs().max()
    assert gap > 1e-4, "the two arms share running statistics"


def _plan_and_data(digits, tmp_path, optim="sgd"):
    args = training_args(
        str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=32,
        optim=optim,
        optim_args="momentum=0.9" if optim == "sgd" else None,
        learning_rate=0.05 if optim == "sgd" else 1e-3,
        eval_strategy="steps",
        eval_steps=8,
    )
    plan = plan_from_training_args(args, _resnet(0), len(digits["train"]), None)
    train = SplitTensors(digits["train"].pixel_values, digits["train"].labels)
    evals = {"validation": SplitTensors(digits["validation"].pixel_values, digits["validation"].labels)}
    return plan, train, evals


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_rewind_snapshot_and_late_arm_carry_running_statistics(tmp_path, digits, optim):
    k = 6
    plan, train, evals = _plan_and_data(digits, tmp_path, optim)
    tables = batch_tables(plan, len(train.y), 1, "cpu")
    theta0 = _resnet(0).state_dict()
    mask = dict(_conv_masks(_resnet(0), 0.5, seed=1))
    (full,) = train_lockstep(_resnet(0), [ArmStart(theta0, mask)], plan, train, evals, tables, snapshot_step=k)
    assert int(full.snapshot["weights/bn.num_batches_tracked"]) == k
    assert full.snapshot["weights/bn.num_batches_tracked"].dtype == torch.int64
    weights, state = dict(theta0), {}
    for key, value in full.snapshot.items():
        kind, _, name = key.partition("/")
        if kind == "weights":
            weights[name] = value
        else:
            state[key] = value
    late = ArmStart(weights, mask, start_step=k, optimizer_state=state)
    (resumed,) = train_lockstep(_resnet(0), [late], plan, train, evals, tables)
    _close(resumed.weights, full.weights, "resumed at the rewind point")

    # A step-0 arm and the late arm in one pass: the pass rebuilds its engine at step k and carries the first arm's
    # running statistics into it.
    other = ArmStart(_resnet(1).state_dict(), dict(random_masks_like(mask, seed=3)))
    (alone,) = train_lockstep(_resnet(0), [other], plan, train, evals, tables)
    together = train_lockstep(_resnet(0), [other, late], plan, train, evals, tables)
    _close(together[0].weights, alone.weights, "step-0 arm carried across the join")
    _close(together[1].weights, resumed.weights, "late arm beside a step-0 arm")
    assert int(together[0].weights["bn.num_batches_tracked"]) == 16


def test_mutable_tensors_restore_running_statistics(digits):
    """What a CUDA-graph capture does around its warm-up steps: snapshot, step, restore -> the stats are back."""
    models = [_resnet(0), _resnet(1)]
    batched = BatchedMaskedTraining(models, [None, None], optimizer="sgd", lr=0.05, momentum=0.9)
    x, y = digits["train"].pixel_values[:32], digits["train"].labels[:32]
    saved = [t.clone() for t in batched.mutable_tensors()]
    before = batched.state_dict(1)
    batched.step(x, y)
    assert not torch.equal(batched.state_dict(1)["bn.running_mean"], before["bn.running_mean"])
    with torch.no_grad():
        for target, value in zip(batched.mutable_tensors(), saved):
            target.copy_(value)
    for name, value in batched.state_dict(1).items():
        assert torch.equal(value, before[name]), name


def test_lockstep_level_saves_the_running_statistics_the_trainer_backend_saves(tmp_path, digits):
    """A lockstep IMP run of the tiny ResNet: every arm's model.safetensors has the Trainer backend's keys, its own
    running statistics, and the rewind point holds those of step k."""
    folders = {}
    for backend in ("lockstep", "trainer"):
        out = tmp_path / backend
        trainer = TicketTrainer(
            model=_resnet(0),
            args=training_args(
                str(out),
                max_steps=12,
                per_device_train_batch_size=32,
                per_device_eval_batch_size=512,
                optim="sgd",
                optim_args="momentum=0.9",
                learning_rate=0.05,
                eval_strategy="steps",
                eval_steps=6,
            ),
            train_dataset=digits["train"],
            eval_dataset={"validation": digits["validation"], "test": digits["test"]},
            data_collator=TensorImageDataset.collate,
            compute_metrics=accuracy,
            sparsity_config=SparsityConfig(method="imp", levels=1, prune_fraction=0.2, rewind="step", rewind_step=4),
        )
        LotteryRunner(trainer, backend).run(controls=("reinit",))
        folders[backend] = out
    trunk, reference_trunk = str(folders["lockstep"]), str(folders["trainer"])
    level1 = [level_dir(trunk, 1), level_dir(control_dir(trunk, "reinit"), 1)]
    saved = [load_file(os.path.join(f, "model.safetensors")) for f in level1]
    references = [
        load_file(os.path.join(f, "model.safetensors"))
        for f in (level_dir(reference_trunk, 1), level_dir(control_dir(reference_trunk, "reinit"), 1))
    ]
    for state, reference in zip(saved, references):
        assert set(state) == set(reference) and any(k.endswith("running_var") for k in reference)
        for name, value in reference.items():
            assert state[name].dtype == value.dtype, name
            if name.endswith("num_batches_tracked"):  # the same count of training-mode forwards
                assert torch.equal(state[name], value), name
    # the trunk resumes from the rewind point (4 batches seen) for steps 4..12
    assert int(saved[0]["bn.num_batches_tracked"]) == 12
    assert not torch.allclose(saved[0]["bn.running_mean"], saved[1]["bn.running_mean"])
    model = type(_resnet(0)).from_pretrained(level1[0])  # loads as a stock transformers model
    assert torch.equal(model.bn.running_var, saved[0]["bn.running_var"])
    point = load_rewind_point(os.path.join(trunk, REWIND_DIR), _resnet(0), set())
    assert int(point.weights["bn.num_batches_tracked"]) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_keeps_per_arm_running_statistics(digits):
    """The captured step writes the running statistics in place on its static buffers: graph replay ends where the
    eager steps end (two replicates' own batches, a late arm joining with its snapshot's statistics)."""
    device = torch.device("cuda")
    steps, k = 40, 10
    plan = TrainPlan(
        total_steps=steps,
        batch_size=32,
        lrs=[0.05 * (1 - s / steps) for s in range(steps)],
        optimizer="sgd",
        momentum=0.9,
        max_grad_norm=1.0,
        eval_steps=20,
    )
    train = SplitTensors(digits["train"].pixel_values.to(device), digits["train"].labels.to(device))
    evals = {
        "validation": SplitTensors(
            digits["validation"].pixel_values.to(device), digits["validation"].labels.to(device)
        )
    }
    tables = batch_tables(plan, len(train.y), 2, device)
    theta0 = _resnet(0).state_dict()
    mask = dict(_conv_masks(_resnet(0), 0.5, seed=1))
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        (first,) = train_lockstep(
            _resnet(0), [ArmStart(theta0, mask)], plan, train, evals, tables, snapshot_step=k, use_cuda_graph=False
        )
        weights = dict(theta0, **{key[8:]: v for key, v in first.snapshot.items() if key.startswith("weights/")})
        state = {key: v for key, v in first.snapshot.items() if not key.startswith("weights/")}
        arms = [
            ArmStart(_resnet(1).state_dict(), dict(random_masks_like(mask, seed=2)), 0, None, 1),
            ArmStart(weights, mask, k, state, 0),
        ]
        eager = train_lockstep(_resnet(0), arms, plan, train, evals, tables, use_cuda_graph=False)
        graph = train_lockstep(_resnet(0), arms, plan, train, evals, tables, use_cuda_graph=True)
    for i, (a, b) in enumerate(zip(graph, eager)):
        _close(a.weights, b.weights, f"arm {i}, graph vs eager")
        assert int(a.weights["bn.num_batches_tracked"]) == steps
        assert a.history[-1]["validation"]["loss"] == pytest.approx(b.history[-1]["validation"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_benchmark_script_runs_on_cpu_at_a_tiny_size(tmp_path):
    """benchmarks/bn_lockstep.py end to end (--tiny): both paths train every arm and the JSON holds the ratio."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bn_lockstep.py")
    spec = importlib.util.spec_from_file_location("bn_lockstep_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bn.json"
    result = module.main(["--device", "cpu", "--tiny", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["speedup"] == pytest.approx(result["trainer_seconds"] / result["lockstep_seconds"])
    assert saved["arms"] == 2 and len(saved["lockstep_final_validation_loss"]) == 2
    assert all(0 < loss < 10 for loss in saved["lockstep_final_validation_loss"])
