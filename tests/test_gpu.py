"""CUDA-only checks: bf16 autocast and fp16 GradScaler steps (skipped ones included) keep masked weights at zero.

Deselected by default (pyproject addopts); run on a GPU machine with:

    python -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider

Self-contained apart from the tiny model builders in tests/conftest.py; needs no downloads and no `datasets`.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_BUILDERS, ViolationCounter, make_dataset, training_args
from transformers import TrainerCallback

from hf_tickets import SparsityConfig, TicketTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STRESS = {
    "use_cpu": False,
    "max_steps": 200,
    "gradient_accumulation_steps": 2,
    "per_device_train_batch_size": 2,
    "optim": "adamw_torch",
    "weight_decay": 0.1,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "logging_steps": 50,
}
CONFIG = SparsityConfig(method="magnitude", sparsity=0.8)


@pytest.fixture(params=["triton", "foreach"])
def enforcement_path(request, monkeypatch):
    """Run each test through both enforcement paths of hf_tickets.kernels (one launch, or the foreach fallback)."""
    if request.param == "foreach":
        monkeypatch.setenv("HF_TICKETS_DISABLE_TRITON", "1")
    else:
        monkeypatch.delenv("HF_TICKETS_DISABLE_TRITON", raising=False)
    return request.param


def _kernel_in_use(trainer):
    _, masker = trainer.sparsity_callback.enforcer()._bound()
    return bool(masker.enabled)


def _check_path(trainer, path):
    from hf_tickets.kernels import _HAS_TRITON

    assert _kernel_in_use(trainer) == (path == "triton" and _HAS_TRITON)


def _nonfinite(model):
    return sum(int((~torch.isfinite(p.detach())).sum()) for p in model.parameters())


# ---- bf16 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "vit", "cnn"])
def test_bf16_autocast_keeps_masked_weights_zero(kind, tmp_path, enforcement_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    model = MODEL_BUILDERS[kind]()
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, bf16=True, **STRESS),
        train_dataset=make_dataset(kind, 16),
        sparsity_config=CONFIG,
    )
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    masks_before = trainer.masks.clone()
    trainer.train()

    assert next(model.parameters()).device.type == "cuda"
    assert all(m.device.type == "cuda" for m in trainer.masks.values()), "masks follow the model to the GPU"
    assert len(counter.per_step) == 200 and counter.total == 0
    assert trainer.masks == masks_before
    assert _nonfinite(model) == 0
    _check_path(trainer, enforcement_path)


def test_bf16_weights_keep_masked_weights_zero(tmp_path, enforcement_path):
    """Pure bf16 parameters (not only autocast): the masking path must handle a non-fp32 dtype."""
    model = MODEL_BUILDERS["bert"]().to(torch.bfloat16)
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, **dict(STRESS, max_steps=50)),
        train_dataset=make_dataset("bert", 16),
        sparsity_config=CONFIG,
    )
    counter = ViolationCounter(trainer.masks, model)
    trainer.add_callback(counter)
    trainer.train()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(counter.per_step) == 50 and counter.total == 0
    _check_path(trainer, enforcement_path)


# ---- fp16 with GradScaler, one step forced to overflow ------------------------------------------------------------

INF_STEP = 5


class _InfLossTrainer(TicketTrainer):
    """Multiplies the loss by inf on optimizer step INF_STEP, so every gradient of that step is inf/nan."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.state.global_step == INF_STEP:
            if return_outputs:
                return out[0] * math.inf, out[1]
            return out * math.inf
        return out


class _StepWatcher(TrainerCallback):
    """Registered after SparsityCallback: records, per optimizer step, whether it was skipped and what changed."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.skipped: list[bool] = []
        self.changed: list[bool] = []
        self.scales: list[float] = []
        self.lrs: list[float] = []
        self._before = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = [p.detach().clone() for p in self.trainer.model.parameters()]
        self.scales.append(float(self.trainer.accelerator.scaler.get_scale()))
        self.lrs.append(self.trainer.lr_scheduler.get_last_lr()[0])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.skipped.append(bool(self.trainer.accelerator.optimizer_step_was_skipped))
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, self.trainer.model.parameters())))


def test_fp16_grad_scaler_skipped_step_changes_nothing(tmp_path, enforcement_path):
    model = MODEL_BUILDERS["bert"]()
    trainer = _InfLossTrainer(
        model=model,
        args=training_args(
            tmp_path, fp16=True, **dict(STRESS, max_steps=20, lr_scheduler_type="linear", logging_steps=1)
        ),
        train_dataset=make_dataset("bert", 16),
        sparsity_config=CONFIG,
    )
    assert trainer.accelerator.scaler is not None, "fp16 training must use a GradScaler"
    counter = ViolationCounter(trainer.masks, model)
    watcher = _StepWatcher(trainer)
    trainer.add_callback(counter)
    trainer.add_callback(watcher)
    masks = trainer.masks
    masks_before = masks.clone()
    trainer.train()

    assert len(watcher.skipped) == 20
    assert watcher.skipped[INF_STEP], "the step with an infinite loss must be skipped by the GradScaler"
    assert not watcher.changed[INF_STEP], "a skipped step must not change any parameter"
    assert watcher.scales[INF_STEP + 1] < watcher.scales[INF_STEP], "the scaler backs off after the overflow"
    assert watcher.lrs[INF_STEP + 1] == watcher.lrs[INF_STEP], "the LR schedule does not advance on a skipped step"
    ran = [i for i, s in enumerate(watcher.skipped) if not s]
    assert len(ran) >= 15 and all(watcher.changed[i] for i in ran), "the other steps train"
    # masks unchanged, zeros intact after every step, nothing non-finite leaked into the weights
    assert trainer.masks is masks and masks == masks_before
    assert counter.per_step == [0] * 20
    assert _nonfinite(model) == 0
    _check_path(trainer, enforcement_path)
