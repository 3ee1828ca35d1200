"""Helpers shared by the pruning-at-initialization methods (SNIP, GraSP, SynFlow): a guard that leaves the model,
its buffers and the RNG as they were, the loss of a model's output, the scoring batches and the exponential
density schedule."""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from .base import BatchSource


def check_int(config: object, name: str, minimum: int = 1) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name}={value!r} must be an int >= {minimum}.")


def check_unstructured(config) -> None:
    if config.pattern != "unstructured":
        raise ValueError(
            f"{type(config).__name__}.pattern={config.pattern!r}: method={config.method!r} prunes unstructured only."
        )


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run scoring code without leaving a trace: the global RNG (CPU and the model's CUDA devices) is forked,
    buffers (BatchNorm running statistics) are restored, and the train/eval flags of every module are put back.
    Gradients are never written: the scorers use `torch.autograd.grad`, not `backward`."""
    devices = sorted(
        {b.device.index for b in model.parameters() if b.device.type == "cuda" and b.device.index is not None}
    )
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for module, training in modes:
            module.training = training


def output_loss(outputs: object, method: str) -> torch.Tensor:
    """`outputs.loss` of a Hugging Face-style output (a ModelOutput, a dict or an object with `.loss`)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"method={method!r} scores weights with the model's own loss, but the model's output has no `loss`: the "
            "training batches must hold `labels` (or whatever makes the model return a loss), and the model must "
            "return a ModelOutput / dict / object with a `loss` field."
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"method={method!r} needs a scalar `loss` tensor from the model, got {type(loss).__name__}.")
    return loss


def take_batches(batches: BatchSource, n: int, method: str) -> list[dict]:
    """Up to `n` batches from a fresh iterator of `batches()`; the iterator is closed at once, so the trainer's
    reader restores its RNG state."""
    if batches is None:
        raise ValueError(f"method={method!r} scores weights on training batches: give the trainer a train_dataset.")
    iterator = iter(batches())
    out: list[dict] = []
    try:
        for batch in iterator:
            out.append(batch)
            if len(out) == n:
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if not out:
        raise ValueError(f"method={method!r} got no training batch to score weights on: the dataset is empty.")
    return out


def schedule_rates(sparsity: float, iterations: int) -> list[float]:
    """The exponential schedule of SynFlow / iterative SNIP: round k of n keeps density**(k/n) (density =
    1 - sparsity), so the last round reaches `sparsity` exactly."""
    density = 1.0 - sparsity
    rates = [1.0 - density ** (k / iterations) for k in range(1, iterations + 1)]
    rates[-1] = sparsity
    return rates


def model_loss(
    model: nn.Module,
    batch: dict,
    targets: Mapping[str, nn.Parameter],
    masks: "Mapping[str, torch.Tensor] | None",
    method: str,
) -> torch.Tensor:
    """The model's own loss on `batch`; with `masks`, of the masked model (weights multiplied by their masks in a
    functional call, so the model's parameters are never written)."""
    if masks is None:
        outputs = model(**batch)
    else:
        overrides = {n: p * masks[n].to(p.dtype) for n, p in targets.items()}
        outputs = torch.func.functional_call(model, overrides, args=(), kwargs=dict(batch), strict=False)
    return output_loss(outputs, method)


def grads(loss: torch.Tensor, params: list[nn.Parameter], create_graph: bool = False) -> list[torch.Tensor]:
    """∂loss/∂params without touching `p.grad` (zeros for parameters the loss does not reach)."""
    out = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


@contextlib.contextmanager
def requiring_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """Let autograd differentiate frozen targets too; their `requires_grad` flags are put back afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
