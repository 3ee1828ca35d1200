"""TicketTrainer / SparsityCallback: masked weights stay exactly zero, hook order, logging, grad-norm after masking."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import (
    MODEL_BUILDERS,
    EventRecorder,
    ViolationCounter,
    make_bert,
    make_cnn,
    make_dataset,
    training_args,
)
from transformers import Trainer, TrainerCallback

from hf_tickets import MaskSet, SparsityCallback, SparsityConfig, TicketTrainer, apply_sparsity
from hf_tickets.enforce import MaskEnforcer, count_violations

# The stress setup of the issue: >= 200 optimizer steps, gradient accumulation, AdamW with weight decay and a learning
# rate high enough that every kept weight moves. Without enforcement this produces violations at the first step.
STRESS = {
    "max_steps": 200,
    "gradient_accumulation_steps": 2,
    "per_device_train_batch_size": 2,
    "optim": "adamw_torch",
    "weight_decay": 0.1,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "logging_steps": 50,
}
STRESS_CONFIG = SparsityConfig(method="magnitude", sparsity=0.8)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _callback_index(trainer, cls_or_obj):
    for i, cb in enumerate(trainer.callback_handler.callbacks):
        if cb is cls_or_obj or (isinstance(cls_or_obj, type) and isinstance(cb, cls_or_obj)):
            return i
    raise AssertionError(f"{cls_or_obj} not registered")


# ---- the core claim: zero violations over >= 200 steps ----------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "vit", "cnn"])
def test_masked_weights_are_exactly_zero_after_every_optimizer_step(kind, tmp_path):
    model = MODEL_BUILDERS[kind]()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, **STRESS),
        train_dataset=make_dataset(kind, 16),
        sparsity_config=STRESS_CONFIG,
    )
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    assert _callback_index(trainer, trainer.sparsity_callback) < _callback_index(trainer, counter)
    masks_before = trainer.masks.clone()
    before = _snapshot(model)

    trainer.train()

    assert trainer.state.global_step == 200
    assert len(counter.per_step) == 200
    assert counter.total == 0, f"violations at steps {[i for i, v in enumerate(counter.per_step) if v]}"
    assert trainer.masks == masks_before, "one-shot masks must not change during training"
    # the setup really trains: weight decay is on for the masked tensors, and the kept weights moved
    params = dict(model.named_parameters())
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert all(id(params[n]) in decayed for n in trainer.masks)
    kept_moved = sum(int((params[n][m] != before[n][m]).sum()) for n, m in trainer.masks.items())
    assert kept_moved > 0.9 * trainer.masks.kept()


@pytest.mark.parametrize("kind", ["bert", "vit", "cnn"])
def test_same_setup_without_enforcement_has_violations(kind, tmp_path):
    """Control: a plain Trainer after apply_sparsity lets AdamW regrow pruned weights, so the test above can fail."""
    model = MODEL_BUILDERS[kind]()
    masks = apply_sparsity(model, STRESS_CONFIG)
    assert count_violations(model, masks) == 0
    trainer = Trainer(model=model, args=training_args(tmp_path, **STRESS), train_dataset=make_dataset(kind, 16))
    counter = ViolationCounter(masks, model)
    trainer.add_callback(counter)
    trainer.train()
    assert len(counter.per_step) == 200
    assert counter.per_step[0] > 0 and counter.total > 0


@pytest.mark.parametrize("enforce_weights", [True, False])
def test_masks_changed_mid_training_stay_zero_despite_momentum(enforce_weights, tmp_path, monkeypatch):
    """Re-masking the weights and zeroing optimizer state matter once weights with optimizer momentum get pruned.

    At step 10 the masks are replaced by stricter ones; Adam's moments of the newly pruned weights are not zero, so
    masking gradients alone would move them off zero. The control (`enforce_weights=False`: no weight re-masking
    after steps, no optimizer-state zeroing) shows that it does.
    """
    model = make_bert()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, **dict(STRESS, max_steps=20)),
        train_dataset=make_dataset("bert", 16),
        sparsity_config=SparsityConfig(sparsity=0.5),
    )
    if not enforce_weights:
        trainer.sparsity_callback.on_optimizer_step = lambda *args, **kwargs: None
        monkeypatch.setattr(MaskEnforcer, "zero_optimizer_state_", lambda self, optimizer: None)

    class Prune(TrainerCallback):
        def __init__(self):
            self.violations = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                stricter = apply_sparsity(copy.deepcopy(model), SparsityConfig(sparsity=0.9))
                trainer.set_masks(stricter)

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.violations.append(count_violations(model, trainer.masks))

    prune = Prune()
    trainer.add_callback(prune)
    trainer.train()
    assert trainer.masks.sparsity() == pytest.approx(0.9, abs=1e-4)
    if enforce_weights:
        assert sum(prune.violations) == 0
    else:
        assert sum(prune.violations[10:]) > 0


def test_sparsity_callback_with_a_plain_trainer(tmp_path):
    model = make_cnn()
    masks = apply_sparsity(model, STRESS_CONFIG)
    counter = ViolationCounter(masks, model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **dict(STRESS, max_steps=20)),
        train_dataset=make_dataset("cnn", 16),
        callbacks=[SparsityCallback(masks)],  # model taken from the callback kwargs
    )
    trainer.add_callback(counter)
    trainer.train()
    assert len(counter.per_step) == 20 and counter.total == 0


def test_on_train_begin_re_zeroes_weights_changed_since(tmp_path):
    model = make_cnn()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=make_dataset("cnn", 8),
        sparsity_config=SparsityConfig(sparsity=0.5),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert count_violations(model, trainer.masks) > 0
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.per_step == [0]


# ---- per optimizer step, not per micro-step; hook order ----------------------------------------------------------


def test_masks_are_enforced_once_per_optimizer_step_not_per_micro_step(tmp_path, monkeypatch):
    accumulation, steps = 4, 5
    model = make_bert()
    trainer = TicketTrainer(
        model=model,
        args=training_args(
            tmp_path, max_steps=steps, gradient_accumulation_steps=accumulation, per_device_train_batch_size=2
        ),
        train_dataset=make_dataset("bert", 64),
        sparsity_config=SparsityConfig(sparsity=0.7),
    )
    calls = {"mask_weights_": 0, "mask_grads_": 0}
    masks = trainer.masks
    for name in calls:
        original = getattr(MaskEnforcer, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(MaskEnforcer, name, counting)
    recorder, counter = EventRecorder(), ViolationCounter(masks, model)
    trainer.add_callback(recorder)
    trainer.add_callback(counter)
    trainer.train()

    assert recorder.events.count("on_substep_end") == steps * (accumulation - 1)
    assert recorder.events.count("on_optimizer_step") == steps
    assert calls["mask_grads_"] == steps, "gradients are masked once per optimizer step"
    assert calls["mask_weights_"] == steps + 1, "weights are masked once per optimizer step (+ once at train begin)"
    assert counter.per_step == [0] * steps


def test_hook_order_each_step(tmp_path):
    """Like transformers' test_trainer_callback: the recorded events come in loop order."""
    model = make_cnn()

    class Check(TrainerCallback):
        """Registered after SparsityCallback: grads are masked before the step, weights zero after it."""

        def __init__(self):
            self.checks = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            masks = trainer.masks
            params = dict(model.named_parameters())
            self.checks.append(all(bool((params[n].grad[~m] == 0).all()) for n, m in masks.items()))

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.checks.append(count_violations(model, trainer.masks) == 0)

    recorder = EventRecorder()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(sparsity=0.5),
        callbacks=[recorder],
    )
    check = Check()
    trainer.add_callback(check)
    trainer.train()

    events = recorder.events
    assert events[0] == "on_init_end" and events[1] == "on_train_begin" and events[-1] == "on_train_end"
    loop = ["on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    assert [e for e in events if e in loop] == loop * 3
    for step in range(3):
        pre = [i for i, e in enumerate(events) if e == "on_pre_optimizer_step"][step]
        post = [i for i, e in enumerate(events) if e == "on_optimizer_step"][step]
        assert pre < post
    assert check.checks == [True] * 6


# ---- logging ------------------------------------------------------------------------------------------------------


def test_sparsity_is_logged(tmp_path):
    model = make_cnn()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, logging_steps=1),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=SparsityConfig(sparsity=0.6, scope="layerwise"),
    )
    trainer.train()
    step_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(step_logs) == 3
    for entry in trainer.state.log_history:  # the train summary too
        assert entry["sparsity"] == pytest.approx(trainer.masks.sparsity(), abs=1e-6)
    # per-layer sparsity: on the first line after the masks are set, not repeated while they do not change
    first, *rest = trainer.state.log_history
    for name, value in trainer.masks.layer_sparsity().items():
        assert first[f"sparsity/{name}"] == pytest.approx(value, abs=1e-6)
    assert {k for k in first if k.startswith("sparsity/")} == {f"sparsity/{n}" for n in trainer.masks}
    assert all(not any(k.startswith("sparsity/") for k in entry) for entry in rest)
    # new masks: the next line carries the new per-layer values
    new_masks = apply_sparsity(model, SparsityConfig(sparsity=0.8, scope="layerwise"))
    trainer.set_masks(new_masks)
    trainer.log({"loss": 0.0})
    last = trainer.state.log_history[-1]
    assert {k for k in last if k.startswith("sparsity/")} == {f"sparsity/{n}" for n in trainer.masks}
    assert last["sparsity"] == pytest.approx(0.8, abs=1e-2)


# ---- gradient norm after masking -----------------------------------------------------------------------------------


class _GradRecordingTrainer(TicketTrainer):
    """Keeps a copy of the dense gradients of each step (what a method's on_dense_grads hook sees)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw_grads = []
        original = self.sparsity_callback.dense_grads_ready

        def record(model, step):
            self.raw_grads.append(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            )
            original(model, step)

        self.sparsity_callback.dense_grads_ready = record


def _norms(raw_grads, masks):
    masked = math.sqrt(sum(float(((g * masks[n]) if n in masks else g).pow(2).sum()) for n, g in raw_grads.items()))
    dense = math.sqrt(sum(float(g.pow(2).sum()) for g in raw_grads.values()))
    return masked, dense


def _train_and_compare_grad_norms(tmp_path, max_grad_norm):
    model = make_bert()
    trainer = _GradRecordingTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, logging_steps=1, max_grad_norm=max_grad_norm),
        train_dataset=make_dataset("bert", 16),
        sparsity_config=SparsityConfig(sparsity=0.9),
    )
    clipped = []

    class AfterClipping(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clipped.append(
                math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
            )

    trainer.add_callback(AfterClipping())
    trainer.train()
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == len(trainer.raw_grads) == 3
    return trainer, logged, clipped


def test_grad_norm_used_for_clipping_and_logged_is_the_masked_norm(tmp_path):
    trainer, logged, clipped = _train_and_compare_grad_norms(tmp_path, max_grad_norm=1e-3)
    for raw, norm in zip(trainer.raw_grads, logged):
        masked, dense = _norms(raw, trainer.masks)
        assert dense > 1.05 * masked, "the test needs masking to change the norm"
        assert norm == pytest.approx(masked, rel=1e-4)
    # clipping scaled the masked gradient to max_grad_norm (a pre-masking norm would leave it smaller)
    assert clipped == pytest.approx([1e-3] * 3, rel=1e-3)


def test_grad_norm_logged_without_clipping_is_the_masked_norm(tmp_path):
    trainer, logged, _ = _train_and_compare_grad_norms(tmp_path, max_grad_norm=0.0)
    for raw, norm in zip(trainer.raw_grads, logged):
        masked, _ = _norms(raw, trainer.masks)
        assert norm == pytest.approx(masked, rel=1e-4)


# ---- model stays vanilla ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "cnn"])
def test_state_dict_keys_equal_the_dense_models(kind, tmp_path):
    dense = MODEL_BUILDERS[kind]()
    sparse = MODEL_BUILDERS[kind]()
    apply_sparsity(sparse, SparsityConfig(sparsity=0.9))
    assert list(sparse.state_dict()) == list(dense.state_dict())
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in dense.named_parameters()]
    assert [n for n, _ in sparse.named_buffers()] == [n for n, _ in dense.named_buffers()]
    for module in sparse.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not torch.nn.utils.parametrize.is_parametrized(module)
    copy.deepcopy(sparse)  # torch.nn.utils.prune breaks this
    dense.load_state_dict(sparse.state_dict(), strict=True)


def test_state_dict_keys_unchanged_by_training(tmp_path):
    model = make_cnn()
    keys = list(model.state_dict())
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=make_dataset("cnn", 8),
        sparsity_config=SparsityConfig(sparsity=0.5),
    )
    trainer.train()
    assert list(model.state_dict()) == keys


# ---- ways to hand masks to TicketTrainer --------------------------------------------------------------------------


def test_trainer_takes_masks_from_apply_sparsity(tmp_path):
    model = make_cnn()
    masks = apply_sparsity(model, SparsityConfig(method="random", sparsity=0.7, seed=5))
    trainer = TicketTrainer(
        model=model, args=training_args(tmp_path, max_steps=1), train_dataset=make_dataset("cnn", 8)
    )
    assert trainer.masks is masks
    assert trainer.sparsity_config.method == "random" and trainer.sparsity_config.seed == 5


def test_trainer_takes_explicit_masks(tmp_path):
    donor = make_cnn(seed=1)
    masks = apply_sparsity(donor, SparsityConfig(sparsity=0.6))
    model = make_cnn(seed=2)
    trainer = TicketTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=make_dataset("cnn", 8), masks=masks
    )
    assert trainer.masks == masks and count_violations(model, masks) == 0
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    trainer.train()
    assert counter.per_step == [0, 0]


def test_set_masks_zeroes_at_once(tmp_path):
    model = make_cnn()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=make_dataset("cnn", 8),
        sparsity_config=SparsityConfig(sparsity=0.3),
    )
    stricter = MaskSet({n: m & (torch.rand(m.shape) < 0.5) for n, m in trainer.masks.items()})
    trainer.set_masks(stricter)
    assert trainer.masks is stricter and trainer.sparsity_callback.masks is stricter
    assert count_violations(model, stricter) == 0


def test_bf16_autocast_on_cpu_keeps_zeros(tmp_path):
    model = make_cnn()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, **dict(STRESS, max_steps=20, bf16=True)),
        train_dataset=make_dataset("cnn", 16),
        sparsity_config=STRESS_CONFIG,
    )
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    trainer.train()
    assert len(counter.per_step) == 20 and counter.total == 0


def test_masks_from_an_imp_level_are_trained_as_given(tmp_path):
    masks = apply_sparsity(make_cnn(seed=1), SparsityConfig(sparsity=0.6))
    masks.metadata.update(method="imp", level=3, rewind="init")  # as written by an IMP level
    model = make_cnn(seed=2)
    trainer = TicketTrainer(
        model=model, args=training_args(tmp_path, max_steps=2), train_dataset=make_dataset("cnn", 8), masks=masks
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.masks == masks
