"""The lockstep backend: `BatchedMaskedTraining` extras, `train_lockstep`, and `LotteryRunner(backend="lockstep")`.

References are the plain torch loop `TicketTrainer` enforces for one network (forward, backward, mask the
gradients, clip, `torch.optim` step, mask the weights) and the sequential ("trainer") engine's on-disk layout and
semantics. CPU, float32, tiny MLPs on random data or scikit-learn's digits; the whole file runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import training_args
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer
from hf_tickets.allocation import random_masks_like
from hf_tickets.data import TensorImageDataset, load_splits
from hf_tickets.enforce import MaskEnforcer, apply_masks_, count_violations
from hf_tickets.lottery import LotteryRunner, run_controls, run_experiment
from hf_tickets.lottery import lockstep_backend as backend_module
from hf_tickets.lottery.batched import BatchedMaskedTraining
from hf_tickets.lottery.lockstep import (
    ArmStart,
    SplitTensors,
    TrainPlan,
    batch_tables,
    plan_from_training_args,
    train_lockstep,
)
from hf_tickets.lottery.rewind import load_rewind_point
from hf_tickets.lottery.runner import REINIT_SEED_OFFSET, REPLICATE_SEED_OFFSET
from hf_tickets.lottery.start_weights import fresh_init_weights
from hf_tickets.models import build_model
from hf_tickets.recipes import accuracy, build_trainer, load_recipe

RTOL, ATOL = 1e-5, 1e-6
BATCH = 16
SMALL_MLP = {"hidden_sizes": [32, 16], "image_size": 8, "num_channels": 1, "num_labels": 10}
QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "quickstart_digits.yaml")


# ---- helpers --------------------------------------------------------------------------------------------------------


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet_300_100", **SMALL_MLP)


def _masks(model: torch.nn.Module, density: float, seed: int) -> MaskSet:
    """Random masks on every weight matrix (biases dense), `density` of the entries kept."""
    g = torch.Generator().manual_seed(seed)
    return MaskSet(
        {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if n.endswith("weight")}
    )


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close_dicts(got: dict, want: dict, rtol=RTOL, atol=ATOL, what: str = "") -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _reference_step(model, opt, masks, x, y, max_grad_norm=None) -> tuple[float, float]:
    """One step of the loop TicketTrainer enforces; returns (loss, gradient norm before clipping, after masking)."""
    loss = F.cross_entropy(model(x).logits, y)
    opt.zero_grad()
    loss.backward()
    if masks is not None:
        MaskEnforcer(masks, model).mask_grads_()
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    opt.step()
    if masks is not None:
        apply_masks_(model, masks)
    return float(loss.detach()), norm


def _decay_groups(model, weight_decay: float) -> list[dict]:
    params = list(model.named_parameters())
    return [
        {"params": [p for n, p in params if not n.endswith("bias")], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n.endswith("bias")], "weight_decay": 0.0},
    ]


def _weight_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if not n.endswith("bias")}


# ---- 1-4: BatchedMaskedTraining: clipping, decay exemptions, per-arm state, loss + accuracy ------------------------


@pytest.mark.parametrize(
    "kind, hp",
    [("sgd", {"lr": 0.1, "momentum": 0.9}), ("adamw", {"lr": 1e-2, "weight_decay": 0.01})],
)
def test_clipping_matches_clip_grad_norm_after_masking(kind, hp):
    max_norm, steps = 0.5, 10
    x, y = _data(256)
    batches = _batches(x, y, steps, seed=3)
    seeds = [0, 1]
    masks = [_masks(_model(0), 0.4, seed=10), _masks(_model(0), 0.6, seed=11)]
    batched = BatchedMaskedTraining([_model(s) for s in seeds], masks, optimizer=kind, max_grad_norm=max_norm, **hp)
    unclipped = BatchedMaskedTraining([_model(s) for s in seeds], masks, optimizer=kind, **hp)
    for xb, yb in batches:
        batched.step(xb, yb)
        unclipped.step(xb, yb)
    assert batched.count_violations() == [0, 0]

    norms = []
    for i, (seed, mask) in enumerate(zip(seeds, masks)):
        model = _model(seed)
        apply_masks_(model, mask)
        opt_cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
        opt = opt_cls(model.parameters(), **hp)
        for xb, yb in batches:
            norms.append(_reference_step(model, opt, mask, xb, yb, max_grad_norm=max_norm)[1])
        _assert_close_dicts(batched.state_dict(i), _weights(model), what=f"{kind} arm {i}")
    assert max(norms) > max_norm, f"clipping never triggered (largest gradient norm {max(norms):.3f}): raise the lr"
    moved = max(float((batched.params[n] - unclipped.params[n]).abs().max()) for n in batched.params)
    assert moved > 1e-4, "max_grad_norm made no difference: the clipping path was not exercised"


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_decay_names_exempt_biases_like_torch_param_groups(kind):
    wd, steps = 0.1, 10
    hp = {"lr": 1e-2} if kind != "sgd" else {"lr": 0.1, "momentum": 0.9}
    x, y = _data(256)
    batches = _batches(x, y, steps, seed=4)
    mask = _masks(_model(0), 0.5, seed=1)
    decay = _weight_names(_model(0))
    batched = BatchedMaskedTraining([_model(0)], [mask], optimizer=kind, weight_decay=wd, decay_names=decay, **hp)
    decay_all = BatchedMaskedTraining([_model(0)], [mask], optimizer=kind, weight_decay=wd, **hp)
    for xb, yb in batches:
        batched.step(xb, yb)
        decay_all.step(xb, yb)

    model = _model(0)
    apply_masks_(model, mask)
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[kind]
    opt = cls(_decay_groups(model, wd), **hp)
    for xb, yb in batches:
        _reference_step(model, opt, mask, xb, yb)
    _assert_close_dicts(batched.state_dict(0), _weights(model), what=f"{kind} decay on weights only")
    bias_gap = max(float((batched.params[n] - decay_all.params[n]).abs().max()) for n in batched.params if "bias" in n)
    assert bias_gap > 1e-5, "exempting biases from weight decay changed nothing: decay_names was ignored"


def test_arm_state_round_trip_and_pruned_state_is_zeroed():
    x, y = _data(256)
    batches = _batches(x, y, 12, seed=5)
    names = [n for n, _ in _model(0).named_parameters()]
    shared_mask = _masks(_model(0), 0.5, seed=1)
    batched = BatchedMaskedTraining(
        [_model(0), _model(1)], [shared_mask, shared_mask], optimizer="adamw", lr=1e-2, weight_decay=0.01
    )
    for xb, yb in batches[:5]:
        batched.step(xb, yb)
    assert batched.step_count == 5
    state = batched.arm_state(0)
    assert set(state) == {f"{kind}/{n}" for kind in ("weights", "exp_avg", "exp_avg_sq") for n in names}
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.startswith("exp_avg/"))
    frozen = {k: v.clone() for k, v in state.items()}
    batched.load_arm_state(1, state)
    for key, value in batched.arm_state(1).items():
        assert torch.equal(value, state[key]), f"{key} was not loaded exactly"
    for xb, yb in batches[5:]:
        losses = batched.step(xb, yb)
        torch.testing.assert_close(losses[0], losses[1], msg="arms with one state and one batch diverged")
    _assert_close_dicts(batched.state_dict(1), batched.state_dict(0), what="arm 1 (loaded from arm 0)")
    for key, value in state.items():  # arm_state hands out copies, not views of the training buffers
        assert torch.equal(value, frozen[key])
    assert not torch.equal(batched.arm_state(0)["weights/classifier.weight"], frozen["weights/classifier.weight"])

    # Different masks: loading arm 0's state into arm 1 keeps it only where arm 1's mask keeps the weight.
    m0, m1 = _masks(_model(0), 0.5, seed=2), _masks(_model(0), 0.5, seed=3)
    two = BatchedMaskedTraining([_model(0), _model(1)], [m0, m1], optimizer="adamw", lr=1e-2)
    for xb, yb in batches[:5]:
        two.step(xb, yb)
    source = two.arm_state(0)
    two.load_arm_state(1, source)
    got = two.arm_state(1)
    revived = 0
    for kind in ("weights", "exp_avg", "exp_avg_sq"):
        for name, keep in m1.items():
            value, src = got[f"{kind}/{name}"], source[f"{kind}/{name}"]
            assert torch.count_nonzero(value[~keep]) == 0, f"pruned {kind} of {name} survived load_arm_state"
            assert torch.equal(value[keep], src[keep])
            revived += int(torch.count_nonzero(src[~keep]))
    assert revived > 0, "the source state had nothing at arm 1's pruned positions: the zeroing was not tested"
    assert two.count_violations() == [0, 0]

    # Partial states load what they name; keys of another optimizer are refused.
    before = two.arm_state(1)
    two.load_arm_state(1, {f"weights/{n}": source[f"weights/{n}"] for n in names})
    after = two.arm_state(1)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("weights/"))
    with pytest.raises(ValueError, match="momentum_buffer"):
        two.load_arm_state(0, {"momentum_buffer/classifier.weight": torch.zeros(10, 16)})
    two.set_step_count(42)
    assert two.step_count == 42

    sgd = BatchedMaskedTraining([_model(0)], [m0], optimizer="sgd", lr=0.1, momentum=0.9)
    sgd.step(*batches[0])
    assert {k.split("/")[0] for k in sgd.arm_state(0)} == {"weights", "momentum_buffer"}
    assert sgd.step_count == 0
    with pytest.raises(IndexError):
        sgd.arm_state(1)


def test_mutable_tensors_restore_replays_the_same_step():
    x, y = _data(64)
    xb, yb = x[:BATCH], y[:BATCH]
    batched = BatchedMaskedTraining(
        [_model(0), _model(1)], [_masks(_model(0), 0.5, 1), None], optimizer="adamw", lr=1e-2
    )
    batched.step(xb, yb)
    saved = [t.clone() for t in batched.mutable_tensors()]
    first_losses = batched.step(x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])
    first = batched.unstack()
    assert batched.step_count == 2
    with torch.no_grad():
        for tensor, value in zip(batched.mutable_tensors(), saved):
            tensor.copy_(value)
    assert batched.step_count == 1
    again = batched.step(x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])
    assert torch.equal(again, first_losses)
    for i in range(2):
        _assert_close_dicts(batched.state_dict(i), first[i], rtol=0, atol=0, what=f"replayed arm {i}")


def test_evaluate_loss_accuracy_matches_cross_entropy_per_model():
    x, y = _data(300, seed=1)
    masks = [_masks(_model(0), 0.5, seed=s) for s in (1, 2, 3)]
    batched = BatchedMaskedTraining([_model(s) for s in (0, 1, 2)], masks, optimizer="sgd", lr=0.1)
    for xb, yb in _batches(x, y, 15, seed=2):
        batched.step(xb, yb)
    loss, acc = batched.evaluate_loss_accuracy(x, y, batch_size=64)  # 4 full chunks and one of 44
    assert loss.shape == (3,) and acc.shape == (3,)
    assert len(set(acc.tolist())) > 1 or len(set(loss.tolist())) > 1, "three different networks evaluated alike"
    for i in range(3):
        model = build_model("lenet_300_100", **SMALL_MLP)
        model.load_state_dict(batched.state_dict(i))
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        assert float(loss[i]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5, abs=1e-6)
        assert float(acc[i]) == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    with pytest.raises(ValueError, match="same, non-zero"):
        batched.evaluate_loss_accuracy(x[:0], y[:0])


# ---- 5: TrainPlan from TrainingArguments ----------------------------------------------------------------------------


def test_plan_follows_trainer_schedule_and_refuses_what_it_cannot_do(tmp_path):
    model = _model(0)
    args = training_args(
        tmp_path,
        learning_rate=0.1,
        lr_scheduler_type="linear",
        warmup_steps=5,
        max_steps=20,
        eval_strategy="steps",
        eval_steps=7,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=33,
        max_grad_norm=0.25,
        weight_decay=0.03,
        seed=11,
    )
    plan = plan_from_training_args(args, model, num_train_examples=100, decay_names={"hidden.0.weight"})
    assert plan.total_steps == 20 and len(plan.lrs) == 20 and plan.batch_size == 16
    assert plan.lrs[0] == 0.0 and plan.lrs[5] == pytest.approx(0.1)
    for s in range(5):
        assert plan.lrs[s] == pytest.approx(0.1 * s / 5)
    for s in range(5, 20):
        assert plan.lrs[s] == pytest.approx(0.1 * (20 - s) / 15)
    assert all(a > b for a, b in zip(plan.lrs[5:], plan.lrs[6:])) and plan.lrs[-1] > 0
    assert plan.optimizer == "adamw" and plan.momentum == 0.0
    assert plan.max_grad_norm == 0.25 and plan.weight_decay == 0.03 and plan.seed == 11
    assert plan.eval_batch_size == 33 and plan.decay_names == {"hidden.0.weight"}
    assert plan.eval_steps == 7
    assert plan.eval_points(0) == [7, 14, 20] and plan.eval_points(7) == [14, 20] and plan.eval_points(15) == [20]

    cosine = plan_from_training_args(
        training_args(tmp_path, learning_rate=1.0, lr_scheduler_type="cosine", max_steps=10), model, 100
    )
    assert cosine.lrs[0] == pytest.approx(1.0) and cosine.lrs[5] == pytest.approx(0.5)
    assert cosine.eval_steps is None and cosine.eval_points(0) == [10]

    epochs = plan_from_training_args(
        training_args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=16), model, 100
    )
    assert epochs.total_steps == 14  # ceil(100 / 16) = 7 batches per epoch, as the Trainer's DataLoader has

    sgd = plan_from_training_args(
        training_args(tmp_path, optim="sgd", optim_args="momentum=0.9, nesterov=True"), model, 100
    )
    assert (sgd.optimizer, sgd.momentum, sgd.nesterov) == ("sgd", 0.9, True)

    with pytest.raises(ValueError, match="optim"):
        plan_from_training_args(training_args(tmp_path, optim="adafactor"), model, 100)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        plan_from_training_args(training_args(tmp_path, gradient_accumulation_steps=2), model, 100)
    with pytest.raises(ValueError, match="dampening"):
        plan_from_training_args(
            training_args(tmp_path, optim="sgd", optim_args="momentum=0.9,dampening=0.1"), model, 1
        )
    half = training_args(tmp_path)
    half.bf16 = True  # TrainingArguments refuses bf16/fp16 on some CPUs at construction; set it afterwards
    with pytest.raises(ValueError, match="float32"):
        plan_from_training_args(half, model, 100)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_steps": 20, "eval_strategy": "steps", "eval_steps": 7},
        # TrainingArguments documents eval_steps in (0, 1) as a ratio of the total steps (TrainerState.compute_steps)
        {"max_steps": 40, "eval_strategy": "steps", "eval_steps": 0.25, "logging_steps": 3},
        # an epoch of 100 examples in batches of 16 is ceil(100 / 16) = 7 steps (dataloader_drop_last=False)
        {"max_steps": -1, "num_train_epochs": 2, "eval_strategy": "epoch"},
    ],
    ids=["steps", "steps_fraction", "epoch"],
)
def test_plan_evaluates_at_the_steps_trainer_evaluates(tmp_path, overrides):
    from transformers import Trainer

    g = torch.Generator().manual_seed(0)
    data = TensorImageDataset(torch.randn(100, 1, 8, 8, generator=g), torch.randint(0, 10, (100,), generator=g))
    args = training_args(tmp_path, per_device_train_batch_size=16, **overrides)
    trainer = Trainer(
        model=_model(0), args=args, train_dataset=data, eval_dataset=data, data_collator=TensorImageDataset.collate
    )
    trainer.train()
    trainer_points = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    plan = plan_from_training_args(args, _model(0), len(data))
    assert plan.total_steps == trainer.state.global_step
    # The batched engine also evaluates at the last step (early-stop bookkeeping); compare the Trainer's points.
    assert [p for p in plan.eval_points(0) if p in trainer_points or p != plan.total_steps] == trainer_points, (
        f"SOURCE BUG (hf_tickets/lottery/lockstep.py, plan_from_training_args, eval_steps): with {overrides} the "
        f"Trainer evaluates at {trainer_points}, the batched plan at {plan.eval_points(0)}"
    )


def test_plan_refuses_reduce_lr_on_plateau_with_a_value_error(tmp_path):
    # experiment.py's docstring promises "every transformers LR schedule"; ReduceLROnPlateau needs the validation
    # loss, which a precomputed schedule cannot have: it should be refused like adafactor, naming the field.
    args = training_args(tmp_path, lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps", eval_steps=2)
    try:
        plan_from_training_args(args, _model(0), 100)
    except ValueError as err:
        assert "lr_scheduler_type" in str(err)
    except Exception as err:  # noqa: BLE001
        pytest.fail(
            "SOURCE BUG (hf_tickets/lottery/lockstep.py, plan_from_training_args): lr_scheduler_type="
            f"'reduce_lr_on_plateau' fails with {type(err).__name__}: {err} instead of a ValueError naming the field"
        )
    else:
        pytest.fail("reduce_lr_on_plateau was accepted, but the batched engine cannot step it without metrics")


# ---- 6-7: train_lockstep --------------------------------------------------------------------------------------------


def _lockstep_setup(kind: str, total: int = 30):
    model = _model(0)
    x, y = _data(200, seed=7)
    xv, yv = _data(64, seed=8)
    lrs = [0.02 * (total - s) / total for s in range(total)] if kind == "adamw" else [0.2] * total
    plan = TrainPlan(
        total_steps=total,
        batch_size=BATCH,
        lrs=lrs,
        optimizer=kind,
        momentum=0.9 if kind == "sgd" else 0.0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        eval_steps=10,
        decay_names=_weight_names(model),
        eval_batch_size=50,
    )
    train = SplitTensors(x, y)
    evals = {"validation": SplitTensors(xv, yv)}
    return model, plan, train, evals


def _rewound(theta0: dict, snapshot: dict) -> tuple[dict, dict]:
    weights, state = dict(theta0), {}
    for key, value in snapshot.items():
        kind, _, name = key.partition("/")
        if kind == "weights":
            weights[name] = value
        else:
            state[key] = value
    return weights, state


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_lockstep_rewind_and_mixed_start_steps_are_exact(kind):
    k = 10
    template, plan, train, evals = _lockstep_setup(kind)
    tables = batch_tables(plan, len(train.y), 1, "cpu")
    theta0 = template.state_dict()
    mask = _masks(template, 0.5, seed=1)
    evaluated = []
    (full,) = train_lockstep(
        template,
        [ArmStart(theta0, dict(mask))],
        plan,
        train,
        evals,
        tables,
        snapshot_step=k,
        on_eval=lambda step, rows: evaluated.append((step, [r["arm"] for r in rows])),
    )
    assert full.snapshot is not None and [row["step"] for row in full.history] == [10, 20, 30]
    assert evaluated == [(10, [0]), (20, [0]), (30, [0])]
    assert set(full.history[-1]["validation"]) == {"loss", "accuracy"}
    assert full.train_loss == full.train_loss and full.train_loss > 0  # finite mean of the 30 losses
    buffers = {key.split("/")[0] for key in full.snapshot}
    assert buffers == ({"weights", "exp_avg", "exp_avg_sq"} if kind == "adamw" else {"weights", "momentum_buffer"})

    weights, state = _rewound(theta0, full.snapshot)
    late = ArmStart(weights, dict(mask), start_step=k, optimizer_state=state)
    (resumed,) = train_lockstep(template, [late], plan, train, evals, tables)
    _assert_close_dicts(resumed.weights, full.weights, what="resumed at the rewind point")
    assert [row["step"] for row in resumed.history] == [20, 30]
    for a, b in zip(resumed.history, full.history[1:]):
        assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], rel=1e-5)

    # One pass, two start steps: a step-0 arm (other masks, other init) beside the arm joining at k.
    other = ArmStart(_model(1).state_dict(), dict(_masks(template, 0.3, seed=2)))
    (alone_other,) = train_lockstep(template, [other], plan, train, evals, tables)
    together = train_lockstep(template, [other, late], plan, train, evals, tables)
    _assert_close_dicts(together[0].weights, alone_other.weights, what="step-0 arm beside a late arm")
    _assert_close_dicts(together[1].weights, resumed.weights, what="late arm beside a step-0 arm")
    assert [row["step"] for row in together[0].history] == [10, 20, 30]
    assert [row["step"] for row in together[1].history] == [20, 30]
    assert together[0].train_loss == pytest.approx(alone_other.train_loss, rel=1e-5)
    assert together[1].train_loss == pytest.approx(resumed.train_loss, rel=1e-5)


def test_lockstep_refuses_bad_arms():
    template, plan, train, evals = _lockstep_setup("adamw")
    tables = batch_tables(plan, len(train.y), 1, "cpu")
    theta0 = template.state_dict()
    with pytest.raises(ValueError, match="fresh Adam optimizer"):
        train_lockstep(template, [ArmStart(theta0), ArmStart(theta0, start_step=5)], plan, train, evals, tables)
    with pytest.raises(ValueError, match="outside"):
        train_lockstep(template, [ArmStart(theta0, start_step=30)], plan, train, evals, tables)
    with pytest.raises(ValueError, match="replicate"):
        train_lockstep(template, [ArmStart(theta0, replicate=1)], plan, train, evals, tables)
    with pytest.raises(ValueError, match="at least one arm"):
        train_lockstep(template, [], plan, train, evals, tables)


def test_lockstep_arm_equals_torch_loop_on_its_batch_table_and_schedule():
    template, plan, train, evals = _lockstep_setup("adamw")
    tables = batch_tables(plan, len(train.y), 2, "cpu")
    assert tables.shape == (2, plan.total_steps, BATCH)
    assert not torch.equal(tables[0], tables[1]), "replicates must have their own data order"
    mask = _masks(template, 0.5, seed=1)
    (arm,) = train_lockstep(
        template, [ArmStart(template.state_dict(), dict(mask), replicate=1)], plan, train, evals, tables
    )

    model = _model(0)
    apply_masks_(model, mask)
    opt = torch.optim.AdamW(_decay_groups(model, plan.weight_decay), lr=plan.lrs[0])
    losses = []
    for step in range(plan.total_steps):
        for group in opt.param_groups:
            group["lr"] = plan.lrs[step]
        idx = tables[1, step]
        losses.append(_reference_step(model, opt, mask, train.x[idx], train.y[idx], plan.max_grad_norm)[0])
    got = {n: v for n, v in arm.weights.items() if n in dict(model.named_parameters())}
    _assert_close_dicts(got, _weights(model), what="lockstep arm vs torch loop")
    assert arm.train_loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    model.eval()
    with torch.no_grad():
        logits = model(evals["validation"].x).logits
    final = arm.history[-1]["validation"]
    assert final["loss"] == pytest.approx(float(F.cross_entropy(logits, evals["validation"].y)), rel=1e-4)
    assert final["accuracy"] == pytest.approx(float((logits.argmax(-1) == evals["validation"].y).double().mean()))


@pytest.mark.parametrize("neighbour_replicate", [0, 1])
def test_arms_of_one_pass_are_independent(neighbour_replicate):
    template, plan, train, evals = _lockstep_setup("adamw")
    tables = batch_tables(plan, len(train.y), 2, "cpu")
    arm = ArmStart(template.state_dict(), dict(_masks(template, 0.5, seed=1)))
    neighbour = ArmStart(_model(1).state_dict(), dict(_masks(template, 0.2, seed=9)), replicate=neighbour_replicate)
    (alone,) = train_lockstep(template, [arm], plan, train, evals, tables)
    with_neighbour = train_lockstep(template, [arm, neighbour], plan, train, evals, tables)
    _assert_close_dicts(with_neighbour[0].weights, alone.weights, what="arm beside another")
    assert with_neighbour[0].history[-1]["validation"]["loss"] == pytest.approx(
        alone.history[-1]["validation"]["loss"], rel=1e-5
    )
    gap = max(float((with_neighbour[1].weights[n] - alone.weights[n]).abs().max()) for n in alone.weights)
    assert gap > 1e-3, "the neighbour trained like the arm: it did not get its own masks/weights"


# ---- 8-10: LockstepExperiment on digits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_splits("sklearn/digits", seed=0)


@pytest.fixture
def lockstep_calls(monkeypatch):
    """Records the arms of every lockstep pass the experiment runs (and still runs it)."""
    calls: list[dict] = []
    real = backend_module.train_lockstep

    def spy(template, arms, plan, *args, **kwargs):
        calls.append({"arms": list(arms), "snapshot_step": kwargs.get("snapshot_step")})
        return real(template, arms, plan, *args, **kwargs)

    monkeypatch.setattr(backend_module, "train_lockstep", spy)
    return calls


LAYER_RATES = {"classifier": 0.5}


def _imp_config(**overrides) -> SparsityConfig:
    kwargs = dict(
        method="imp",
        levels=2,
        prune_fraction=0.2,
        rewind="step",
        rewind_step=5,
        scope="layerwise",
        layer_rates=LAYER_RATES,
    )
    kwargs.update(overrides)
    return SparsityConfig(**kwargs)


def _experiment_args(out, **overrides):
    kwargs = dict(
        max_steps=30,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=512,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=10,
        logging_steps=10,
    )
    kwargs.update(overrides)
    return training_args(out, **kwargs)


def _experiment(out, digits, replicates=1, config=None, **arg_overrides) -> LotteryRunner:
    trainer = TicketTrainer(
        model=_model(0),
        args=_experiment_args(out, **arg_overrides),
        train_dataset=digits["train"],
        eval_dataset={"validation": digits["validation"], "test": digits["test"]},
        data_collator=TensorImageDataset.collate,
        compute_metrics=accuracy,
        sparsity_config=config or _imp_config(),
    )
    return LotteryRunner(trainer, "lockstep", replicates)


def _point(root) -> dict:
    """The rewind point in lockstep terms: `weights/<name>` and optimizer buffers, whoever wrote it."""
    model = _model(0)
    decay = {n for n, _ in model.named_parameters() if n.endswith("weight")}
    point = load_rewind_point(str(root / "rewind_point"), model, decay)
    return {**{f"weights/{k}": v for k, v in point.weights.items()}, **point.optimizer_state}, point.step


def _metrics(folder) -> dict:
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _level(root, level: int, kind: str = "") -> str:
    return os.path.join(str(root) + (f".{kind}" if kind else ""), f"level_{level:02d}")


def test_experiment_layout_masks_controls_and_rewind(tmp_path, digits, lockstep_calls):
    root = tmp_path / "run"
    exp = _experiment(root, digits)
    assert exp.k == 5 and exp.backend.plan.total_steps == 30
    out = exp.run(controls=("reinit", "random_prune"))
    assert out.trained[-3:] == ["trunk[0] level 2", "reinit[0] level 2", "random_prune[0] level 2"]
    assert out.reused == []

    # One pass per level: the dense trunk alone (it makes the rewind point), then trunk + both controls.
    assert [len(c["arms"]) for c in lockstep_calls] == [1, 3, 3]
    assert [c["snapshot_step"] for c in lockstep_calls] == [5, None, None]
    theta0 = load_file(root / "init_weights.safetensors")
    reinit0 = load_file(root.parent / "run.reinit" / "reinit_weights.safetensors")
    point, step = _point(root)
    assert step == 5
    assert lockstep_calls[0]["arms"][0].start_step == 0
    for call in lockstep_calls[1:]:
        trunk, reinit, rand = call["arms"]
        assert (trunk.start_step, reinit.start_step, rand.start_step) == (5, 0, 5)
        assert reinit.optimizer_state is None
        assert set(trunk.optimizer_state) == {k for k in point if not k.startswith("weights/")}
        for name in theta0:
            assert torch.equal(trunk.weights[name], point[f"weights/{name}"])
            assert torch.equal(rand.weights[name], point[f"weights/{name}"])
            assert torch.equal(reinit.weights[name], reinit0[name])

    # Folders, complete, in the sequential engine's layout.
    for level in range(3):
        for name in ("metrics.json", "model.safetensors", "masks.safetensors", "README.md", "config.json"):
            assert os.path.isfile(os.path.join(_level(root, level), name)), (level, name)
    for kind in ("reinit", "random_prune"):
        assert not os.path.exists(_level(root, 0, kind)), "controls run at pruned levels only"
        for level in (1, 2):
            assert os.path.isfile(os.path.join(_level(root, level, kind), "metrics.json"))
    assert not [p for p in os.listdir(root) if p.endswith(".partial")]

    # Rewind point: a Trainer checkpoint with step k's weights and Adam buffers, different from theta_0 and from
    # the level's end.
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        assert os.path.isfile(root / "rewind_point" / name), name
    assert {k.split("/")[0] for k in point} == {"weights", "exp_avg", "exp_avg_sq"}
    assert {k.split("/", 1)[1] for k in point} == set(theta0)
    final0 = load_file(os.path.join(_level(root, 0), "model.safetensors"))
    for name in theta0:  # (biases included: they start at 0 and move)
        assert not torch.equal(point[f"weights/{name}"], theta0[name])
        assert not torch.equal(point[f"weights/{name}"], final0[name])

    # Trunk masks: nested, with IMP's exact per-layer counts (layerwise, classifier at half rate).
    trunk = [MaskSet.load(_level(root, level)) for level in range(3)]
    assert trunk[0].sparsity() == 0.0
    for level in (1, 2):
        prev, cur = trunk[level - 1], trunk[level]
        assert cur.is_subset_of(prev) and cur.kept() < prev.kept()
        for name in cur:
            rate = 0.2 * (LAYER_RATES["classifier"] if name.startswith("classifier") else 1.0)
            alive = int(prev[name].sum())
            assert int(cur[name].sum()) == alive - round(rate * alive), (level, name)
        assert cur.metadata["level"] == level

    # Controls: reinit = the trunk's masks; random_prune = the trunk's per-layer counts, other positions.
    for level in (1, 2):
        reinit = MaskSet.load(_level(root, level, "reinit"))
        rand = MaskSet.load(_level(root, level, "random_prune"))
        assert reinit == trunk[level]
        assert {n: int(m.sum()) for n, m in rand.items()} == {n: int(m.sum()) for n, m in trunk[level].items()}
        assert rand != trunk[level]
        # replicate 0's random masks: seed + level, whichever backend trains them
        assert rand == MaskSet(random_masks_like(trunk[level], exp.config.seed + level))
        assert rand.metadata["control"] == "random_prune" and reinit.metadata["control"] == "reinit"

    # The reinit control's fresh init: not theta_0, and the sequential engine's (same seed, same init scheme).
    assert all(not torch.equal(reinit0[n], theta0[n]) for n in _weight_names(_model(0)))  # biases start at 0
    expected = fresh_init_weights(_model(0), exp.config.seed + REINIT_SEED_OFFSET, str(tmp_path / "ref.safetensors"))
    _assert_close_dicts(reinit0, load_file(expected), rtol=0, atol=0, what="reinit init vs sequential engine's")

    # Level folders load with from_pretrained, pruned weights exactly zero, kept ones trained (non-zero).
    cls = type(_model(0))
    for folder in [_level(root, 2), _level(root, 1, "reinit"), _level(root, 2, "random_prune")]:
        masks = MaskSet.load(folder)
        model = cls.from_pretrained(folder)
        assert count_violations(model, masks) == 0
        params = dict(model.named_parameters())
        for name, keep in masks.items():
            assert torch.count_nonzero(params[name][~keep]) == 0
            assert torch.count_nonzero(params[name][keep]) == int(keep.sum())

    # metrics.json
    for folder in [_level(root, lv) for lv in range(3)] + [_level(root, 2, "reinit"), _level(root, 1, "random_prune")]:
        m = _metrics(folder)
        assert m["backend"] == "lockstep" and m["steps"] == 30 and m["rewind_step_k"] == 5 and m["rewind"] == "step"
        assert set(m["identity"]) == {"run_sha256", "masks_sha256", "start_weights_sha256", "start_step"}
        assert m["early_stop_step"] in (10, 20, 30)
        assert set(m["test_at_early_stop"]) == {"loss", "accuracy"} and 0 <= m["test_at_early_stop"]["accuracy"] <= 1
        assert m["best_eval"]["loss"] <= m["final_eval"]["loss"]
        assert m["train_loss"] > 0
    dense = _metrics(_level(root, 0))
    assert dense["test_at_early_stop"]["accuracy"] > 0.3, "30 Adam steps on digits learn something"
    for kind in ("reinit", "random_prune"):
        m = _metrics(_level(root, 2, kind))
        assert m["control"] == kind and m["trunk_level"] == 2 and os.path.isfile(m["trunk_masks"])
        assert m["sparsity"] == pytest.approx(_metrics(_level(root, 2))["sparsity"])

    report = json.load(open(root / "imp_report.json", encoding="utf-8"))
    assert [row["level"] for row in report["trunk"]] == [0, 1, 2]
    assert {kind: [row["trunk_level"] for row in rows] for kind, rows in report["controls"].items()} == {
        "reinit": [1, 2],
        "random_prune": [1, 2],
    }
    assert set(report["rewind_vs_reinit_gap"]) == {"1", "2"}
    assert os.path.isfile(root / "imp_accuracy.png")


def test_experiment_restart_trains_only_what_is_missing(tmp_path, digits, lockstep_calls):
    root = tmp_path / "run"
    _experiment(root, digits).run(controls=("random_prune",))
    assert len(lockstep_calls) == 3
    folders = [_level(root, lv) for lv in range(3)] + [_level(root, lv, "random_prune") for lv in (1, 2)]
    before = {f: open(os.path.join(f, "metrics.json"), "rb").read() for f in folders}
    old_weights = load_file(os.path.join(_level(root, 2), "model.safetensors"))
    old_masks = MaskSet.load(_level(root, 2))

    lockstep_calls.clear()
    again = _experiment(root, digits).run(controls=("random_prune",))
    assert again.trained == [] and len(again.reused) == 5
    assert lockstep_calls == [], "a finished experiment was trained again"
    assert {f: open(os.path.join(f, "metrics.json"), "rb").read() for f in folders} == before

    # The last trunk level alone is missing: one pass, one arm, from the rewind point on disk.
    shutil.rmtree(_level(root, 2))
    _experiment(root, digits).run(controls=("random_prune",))
    assert len(lockstep_calls) == 1 and len(lockstep_calls[0]["arms"]) == 1
    assert lockstep_calls[0]["arms"][0].start_step == 5
    assert MaskSet.load(_level(root, 2)) == old_masks, "masks of a retrained level must come from level 1 again"
    # trained alone now, beside the random_prune arm before: the same network up to float rounding
    _assert_close_dicts(
        load_file(os.path.join(_level(root, 2), "model.safetensors")), old_weights, 1e-4, 1e-5, "retrained level 2"
    )
    for folder in folders:
        if folder != _level(root, 2):
            assert open(os.path.join(folder, "metrics.json"), "rb").read() == before[folder]

    # A control level alone, and an interrupted (.partial) level.
    lockstep_calls.clear()
    shutil.rmtree(_level(root, 1, "random_prune"))
    interrupted = _level(root, 2, "random_prune") + ".partial"
    os.replace(_level(root, 2, "random_prune"), interrupted)
    os.remove(os.path.join(interrupted, "metrics.json"))  # what a crash before publish_level leaves
    _experiment(root, digits).run(controls=("random_prune",))
    assert [[a.start_step for a in c["arms"]] for c in lockstep_calls] == [[5], [5]]
    assert os.path.isfile(os.path.join(_level(root, 2, "random_prune"), "metrics.json"))
    assert not os.path.exists(_level(root, 2, "random_prune") + ".partial")

    # Late rewinding needs level 0's rewind point: its loss is an error that says so, not a silent step-0 start.
    shutil.rmtree(root / "rewind_point")
    shutil.rmtree(_level(root, 2))
    lockstep_calls.clear()
    with pytest.raises(ValueError, match="rewind point"):
        _experiment(root, digits).run(controls=("random_prune",))
    assert lockstep_calls == []


def test_replicates_get_own_folders_init_and_data_order(tmp_path, digits, lockstep_calls):
    config = _imp_config(levels=1)
    root = tmp_path / "reps"
    exp = _experiment(root, digits, replicates=2, config=config)
    exp.run(controls=("reinit",))
    assert [sorted(a.replicate for a in c["arms"]) for c in lockstep_calls] == [[0, 1], [0, 0, 1, 1]]
    for r in (0, 1):
        rep = root / f"replicate_{r}"
        for name in ("init_weights.safetensors", "rewind_point", "imp_report.json"):
            assert os.path.exists(rep / name), (r, name)
        for level in (0, 1):
            assert os.path.isfile(os.path.join(_level(rep, level), "metrics.json"))
            assert _metrics(_level(rep, level))["replicate"] == r
        assert os.path.isfile(os.path.join(_level(rep, 1, "reinit"), "metrics.json"))
        report = json.load(open(rep / "imp_report.json", encoding="utf-8"))
        assert [row["level"] for row in report["trunk"]] == [0, 1] and list(report["controls"]) == ["reinit"]
    assert not os.path.exists(_level(root, 0)), "with replicates, no level is written at the top level"
    aggregate = json.load(open(root / "imp_report.json", encoding="utf-8"))
    assert aggregate["replicates"] == 2 and [e["level"] for e in aggregate["levels"]] == [0, 1]
    assert aggregate["levels"][1]["reinit"]["n"] == 2

    init = [load_file(root / f"replicate_{r}" / "init_weights.safetensors") for r in (0, 1)]
    weights = _weight_names(_model(0))  # biases start at 0 in every init
    assert all(not torch.equal(init[0][n], init[1][n]) for n in weights)
    _assert_close_dicts(init[0], _model(0).state_dict(), 0, 0, "replicate 0's theta_0 is the model's")
    seeded = fresh_init_weights(_model(0), config.seed + REPLICATE_SEED_OFFSET, str(tmp_path / "r1.safetensors"))
    _assert_close_dicts(init[1], load_file(seeded), 0, 0, "replicate 1's theta_0")
    reinit = [load_file(root / f"replicate_{r}.reinit" / "reinit_weights.safetensors") for r in (0, 1)]
    assert all(not torch.equal(reinit[0][n], reinit[1][n]) for n in weights)
    final = [load_file(os.path.join(_level(root / f"replicate_{r}", 0), "model.safetensors")) for r in (0, 1)]
    assert all(not torch.equal(final[0][n], final[1][n]) for n in final[0])

    # Replicate 0 is the single-replicate experiment (theta_0 and data order seed + 0), trained per-arm here.
    single = tmp_path / "single"
    _experiment(single, digits, config=config).run()
    _assert_close_dicts(
        load_file(os.path.join(_level(single, 0), "model.safetensors")), final[0], 1e-4, 1e-5, "replicate 0"
    )
    assert _metrics(_level(single, 0))["test_at_early_stop"]["accuracy"] == pytest.approx(
        _metrics(_level(root / "replicate_0", 0))["test_at_early_stop"]["accuracy"]
    )


def test_experiment_defaults_and_argument_errors(tmp_path, digits):
    # Weight decay exemptions default to the Trainer's own (biases and norms), directly or from a TicketTrainer.
    trainer = _ticket_trainer(tmp_path / "t", digits)
    trainer_choice = set(trainer.get_decay_parameter_names(trainer.model))
    assert trainer_choice == _weight_names(_model(0))
    assert _experiment(tmp_path / "d", digits).backend.plan.decay_names == trainer_choice

    with pytest.raises(ValueError, match="replicates"):
        _experiment(tmp_path / "a", digits, replicates=0)
    with pytest.raises(ValueError, match="rewind_step"):
        _experiment(tmp_path / "b", digits, config=_imp_config(rewind_step=30))
    exp = _experiment(tmp_path / "c", digits, config=_imp_config(levels=1))
    with pytest.raises(ValueError, match="control kinds"):
        exp.run(controls=("shuffle",))
    with pytest.raises(ValueError, match="control_levels"):
        exp.run(controls=("reinit",), control_levels=[0])
    with pytest.raises(ValueError, match="no finished pruned level"):
        exp.run(controls=("reinit",), control_levels=[1], train_trunk=False)
    with pytest.raises(ValueError, match="validation"):
        run_experiment(
            _ticket_trainer(tmp_path / "e", digits, eval_dataset={"test": digits["test"]}), backend="lockstep"
        )
    assert not os.path.exists(tmp_path / "c" / "level_00")


# ---- 11-13: run_experiment(trainer, backend="lockstep") from a TicketTrainer ----------------------------------------


class _UserCallback(TrainerCallback):
    pass


def _ticket_trainer(out, digits, config=None, train_dataset=None, eval_dataset="default", **kw):
    arg_overrides = kw.pop("args", {})
    model = _model(0)
    return TicketTrainer(
        model=model,
        args=_experiment_args(out, **arg_overrides),
        train_dataset=digits["train"] if train_dataset is None else train_dataset,
        eval_dataset={"validation": digits["validation"], "test": digits["test"]}
        if eval_dataset == "default"
        else eval_dataset,
        data_collator=TensorImageDataset.collate,
        compute_metrics=kw.pop("compute_metrics", accuracy),
        sparsity_config=config or _imp_config(levels=1),
        **kw,
    )


def test_lockstep_backend_refuses_what_it_would_drop(tmp_path, digits, lockstep_calls):
    import datasets

    with pytest.raises(TypeError, match="run_experiment"):
        _ticket_trainer(tmp_path, digits, engine="batched")
    with pytest.raises(ValueError, match="backend='turbo' is unknown"):
        run_experiment(_ticket_trainer(tmp_path, digits), backend="turbo")
    with pytest.raises(ValueError, match="iterative method"):
        run_experiment(_ticket_trainer(tmp_path, digits, config=SparsityConfig(method="magnitude", sparsity=0.5)))

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match):
            run_experiment(_ticket_trainer(tmp_path, digits, **kw), backend="lockstep")

    fails("rewind='lr'", config=_imp_config(levels=1, rewind="lr"))
    fails("callbacks", callbacks=[_UserCallback()])
    fails("compute_metrics", compute_metrics=lambda pred: {"accuracy": 1.0})
    rows = [digits["train"][i] for i in range(64)]
    fails("TensorImageDataset", train_dataset=rows)
    table = datasets.Dataset.from_dict({"pixel_values": [r["pixel_values"].numpy() for r in rows], "labels": [0] * 64})
    fails("TensorImageDataset", train_dataset=table)
    fails("eval_dataset", eval_dataset=None, args={"eval_strategy": "no"})
    fails("optim", args={"optim": "adafactor"})
    fails("gradient_accumulation_steps", args={"gradient_accumulation_steps": 2})
    model = _model(0)
    with pytest.raises(ValueError, match="optimizers"):
        trainer = TicketTrainer(
            model=model,
            args=_experiment_args(tmp_path),
            train_dataset=digits["train"],
            eval_dataset=digits["validation"],
            sparsity_config=_imp_config(levels=1),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
        run_experiment(trainer, backend="lockstep")
    with pytest.raises(ValueError, match="control kinds"):
        run_experiment(_ticket_trainer(tmp_path, digits), controls=("reinitt",), backend="lockstep")
    assert lockstep_calls == [], "an error path trained before failing"
    assert not os.path.exists(_level(tmp_path, 0))


def _recipe_trainer(out, *overrides: str) -> TicketTrainer:
    """The quickstart recipe's trainer."""
    return build_trainer(load_recipe(QUICKSTART, [f"training.output_dir={out}", *overrides]))


def test_lockstep_experiment_then_control_in_one_pass(tmp_path, lockstep_calls):
    out = tmp_path / "quick"
    trainer = _recipe_trainer(
        out,
        "training.max_steps=40",
        "training.eval_steps=20",
        "training.logging_steps=20",
        "sparsity.levels=2",
        "model.hidden_sizes=[32,16]",
    )
    summary = run_experiment(trainer, controls=("reinit",), backend="lockstep")
    assert summary.last_trunk_metrics["level"] == 2 and summary.trained[-2:] == [
        "trunk[0] level 2",
        "reinit[0] level 2",
    ]
    assert [len(c["arms"]) for c in lockstep_calls] == [1, 2, 2]
    last = MaskSet.load(_level(out, 2))
    assert trainer.masks == last and trainer.masks.sparsity() > 0.3
    assert count_violations(trainer.model, trainer.masks) == 0
    saved = load_file(os.path.join(_level(out, 2), "model.safetensors"))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach().cpu(), saved[name]), f"trainer.model is not level 2's {name}"

    # A control for every finished level in one pass.
    lockstep_calls.clear()
    controls = run_controls(trainer, "random_prune", backend="lockstep")
    assert controls.trained == ["random_prune[0] level 1", "random_prune[0] level 2"]
    assert len(lockstep_calls) == 2 and all(a.start_step == 2 for c in lockstep_calls for a in c["arms"])
    for level in (1, 2):
        rand = MaskSet.load(_level(out, level, "random_prune"))
        trunk = MaskSet.load(_level(out, level))
        assert {n: int(m.sum()) for n, m in rand.items()} == {n: int(m.sum()) for n, m in trunk.items()}
    report = json.load(open(out / "imp_report.json", encoding="utf-8"))
    assert set(report["controls"]) == {"reinit", "random_prune"}

    lockstep_calls.clear()
    trainer.train()  # everything is done: nothing trains again (train() is the trunk on the Trainer backend)
    assert lockstep_calls == []


def test_lockstep_and_trainer_backends_agree_per_level(tmp_path):
    # The quickstart recipe (LeNet-300-100, Adam 1.2e-3, late rewinding to step 10 of 200, clipping at 1.0), one
    # pruned level. The backends see different batch orders (their own samplers), so the numbers are those of two
    # seeds of one experiment, not the same bits: with 200 steps both reach ~98% test accuracy and their mean train
    # losses differ by ~1-2% (deterministic: same result every run on one platform).
    overrides = ("training.max_steps=200", "training.eval_steps=50", "sparsity.levels=1")
    results = {}
    for backend in ("lockstep", "trainer"):
        out = tmp_path / backend
        run_experiment(_recipe_trainer(out, *overrides), backend=backend)
        results[backend] = [_metrics(_level(out, level)) for level in (0, 1)]
    for level in (0, 1):
        batched, sequential = results["lockstep"][level], results["trainer"][level]
        assert batched["backend"] == "lockstep" and sequential["backend"] == "trainer"
        assert batched["sparsity"] == pytest.approx(sequential["sparsity"])
        assert batched["kept"] == sequential["kept"]
        acc_b = batched["test_at_early_stop"]["accuracy"]
        acc_s = sequential["test_at_early_stop"]["accuracy"]
        assert abs(acc_b - acc_s) <= 0.03, f"level {level}: test accuracy {acc_b:.3f} (lockstep) vs {acc_s:.3f}"
        loss_b, loss_s = batched["train_loss"], sequential["train_loss"]
        assert abs(loss_b - loss_s) <= 0.2 * loss_s, f"level {level}: train loss {loss_b:.4f} vs {loss_s:.4f}"
        assert acc_b > 0.9, f"level {level}: the lockstep backend did not learn digits ({acc_b:.3f})"


class _RecordingDataset(TensorImageDataset):
    """Records the batch indices the Trainer's sampler hands out, so the lockstep engine can replay them."""

    def __init__(self, pixel_values, labels):
        super().__init__(pixel_values, labels)
        self.batches: list[list[int]] = []

    def __getitems__(self, indices):
        self.batches.append([int(i) for i in indices])
        return super().__getitems__(indices)


@pytest.mark.parametrize("optim, lr", [("sgd", 0.1), ("adamw_torch", 1.2e-3)], ids=["sgd", "adamw_warmup_from_lr_0"])
def test_lockstep_replaying_trainers_batches_ends_with_trainers_weights(tmp_path, optim, lr):
    """Given Trainer's own batch order, the engine computes Trainer's training: linear warm-up from lr 0, clipping,
    weight decay with Trainer's exemptions, AdamW or SGD. The only difference between the engines is data order."""
    from transformers import Trainer

    splits = load_splits("sklearn/digits", seed=0)
    train = _RecordingDataset(splits["train"].pixel_values, splits["train"].labels)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", image_size=8, num_channels=1, num_labels=10)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    args = training_args(
        str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=32,
        optim=optim,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        dataloader_drop_last=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=TensorImageDataset.collate)
    trainer.train()
    plan = plan_from_training_args(args, model, len(train), set(trainer.get_decay_parameter_names(model)))
    assert plan.lrs[0] == 0.0  # the warm-up starts at lr 0 (Adam's update must not divide by it)
    tables = torch.tensor(train.batches[: plan.total_steps]).unsqueeze(0)
    evals = {"validation": SplitTensors(splits["validation"].pixel_values, splits["validation"].labels)}
    template = build_model("lenet_300_100", image_size=8, num_channels=1, num_labels=10)
    result = train_lockstep(
        template, [ArmStart(theta0)], plan, SplitTensors(train.pixel_values, train.labels), evals, tables
    )[0]
    trained = model.state_dict()
    for name, value in result.weights.items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(result.weights["classifier.weight"], theta0["classifier.weight"])
