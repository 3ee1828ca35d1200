"""Train K masked copies of one architecture at once: stacked parameters, `torch.func.vmap`, stacked masks.

An LTH experiment is many small trainings of the same network (IMP trunk, reinit and random-pruning controls,
replicates). For a network as small as LeNet-300-100 one training step is a few microseconds of GPU work and
hundreds of microseconds of host work (Python, dispatch, kernel launches), so a single network leaves the GPU idle.
`BatchedMaskedTraining` puts the K networks' parameters side by side and runs one forward/backward/update for all
of them: the launch count per step is that of one network, the work per launch is K times larger.

How a step works (`BatchedMaskedTraining.step`):

1. the K losses come from `vmap(loss)` over the stacked parameters (`functional_call` of one storage-less skeleton
   of the module), with the data batch shared by all K networks (`in_dims=None`) or one batch per network; one
   `torch.autograd.grad` of the K losses gives every network's gradient (the losses are independent, so the
   gradient of their sum w.r.t. network k's weights is network k's own; plain autograd through the batched ops
   costs less host time than `vmap(grad(...))`);
2. the K x (all parameters) gradients are concatenated into one flat tensor laid out like the flat parameter
   buffer, so the optimizer is a handful of whole-buffer tensor ops, never a Python loop over networks or layers;
3. pruned gradients are zeroed before the update and pruned weights after it (`enforce.zero_pruned_flat_` with the
   stacked masks), the rule `TicketTrainer` enforces for one network;
4. SGD (momentum, Nesterov, weight decay) or Adam/AdamW with the step count and the learning rate held as device
   tensors.

Nothing in a step reads a value back to the host (no `.item()`, no branching on tensor values) and every shape is
fixed, so the step can be captured in a CUDA graph with static input buffers (see `benchmarks/imp_throughput.py`).
The update rules are those of `torch.optim.SGD` (dampening 0) and `torch.optim.Adam`/`AdamW`, with the step count
and bias corrections on the device: `tests/test_batched.py` checks that K networks trained together end with the same
weights as each trained alone with `torch.optim` and `MaskSet` enforcement.

Normalization layers with running statistics (BatchNorm, InstanceNorm with `track_running_stats=True`): their
`running_mean`, `running_var` and `num_batches_tracked` are stacked `[K, ...]` like the parameters and passed to
`functional_call` with the batch dimension of `vmap`, so in training mode each network normalizes with its own batch
statistics and its forward updates its own running statistics in place (the batching rule of `batch_norm` writes
through to the stacked buffer), exactly as the module would; in eval mode each network normalizes with its own
running statistics. These buffers are network state like the weights: `arm_state` / `load_arm_state` carry them
(keys `weights/<buffer name>`), `mutable_tensors` lists them (a CUDA graph's warm-up steps are undone on them too),
and `state_dict(i)` returns them. `tests/test_bn_lockstep.py` checks them against `Trainer`.

Limits: one floating dtype for all trained parameters; BatchNorm with `momentum=None` (a cumulative average, whose
factor `1 / num_batches_tracked` is read back to the host every step) is refused with `NotImplementedError`; other
buffers are passed stacked and read-only. Dropout draws different randomness per network (`randomness="different"`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..enforce import zero_pruned_flat_

__all__ = ["OPTIMIZERS", "BatchedMaskedTraining", "cross_entropy", "logits_of", "running_stat_names"]

OPTIMIZERS = ("sgd", "adam", "adamw")

ModelsArg = Union[Sequence[nn.Module], Callable[[int], nn.Module]]
MasksArg = Sequence[Optional[Mapping[str, torch.Tensor]]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the value of `F.cross_entropy(logits, labels)`, written as log_softmax + gather.

    Under `vmap`, `F.cross_entropy` runs through Python decompositions of nll_loss; these two ops have native
    batching rules and cost a fraction of the host time.
    """
    return -F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).mean()


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model's output: a tensor, an output object with `.logits` (transformers), or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, an object with "
        "`.logits`, or a tuple whose first element is the logits (or pass output_fn=...)."
    )


class BatchedMaskedTraining:
    """K masked copies of one architecture trained together, each with its own weights, masks and optimizer state.

    Args:
        models: K modules of one architecture (each with its own initial weights, e.g. theta_0 for the trunk and
            random-pruning arms and a fresh initialisation for the reinit arm), or a factory `f(i) -> module`
            called once per arm (K = `len(masks)`). The modules are copied, never changed.
        masks: one mapping per arm, parameter name -> bool mask (True = kept), e.g. a `MaskSet`; None for a dense
            arm. Parameters no mask names are trained densely.
        optimizer: `"sgd"` (torch.optim.SGD, dampening 0), `"adam"` (torch.optim.Adam, L2 weight decay) or
            `"adamw"` (torch.optim.AdamW, decoupled weight decay).
        lr, momentum, nesterov, weight_decay, betas, eps: as in torch.optim; one value for all arms.
        loss_fn: `loss_fn(logits, labels) -> scalar`, default `cross_entropy` (mean, as the hf_tickets models).
        output_fn: maps the module's output to the logits (default `logits_of`).
        device: where to train (default: the device of the first model's parameters).
        randomness: `vmap` randomness for dropout and the like: `"different"` per arm, `"same"`, or `"error"`.
        max_grad_norm: clip each network's gradient to this global norm (measured after masking, as
            `TicketTrainer` does), like `torch.nn.utils.clip_grad_norm_`; None or 0 = no clipping.
        decay_names: the trained parameters weight decay applies to (Trainer exempts biases and norms); None = all.

    Attributes:
        params: name -> stacked parameter `[K, *shape]`, views of one flat buffer (updated in place by `step`).
        masks: name -> stacked bool mask `[K, *shape]` (all True for parameters without a mask).
    """

    def __init__(
        self,
        models: ModelsArg,
        masks: MasksArg,
        *,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        output_fn: Callable[[object], torch.Tensor] = logits_of,
        device: Optional[Union[str, torch.device]] = None,
        randomness: str = "different",
        max_grad_norm: Optional[float] = None,
        decay_names: Optional[Iterable[str]] = None,
    ) -> None:
        masks = list(masks)
        if not masks:
            raise ValueError("masks must hold one entry per network (None for a dense one); got an empty list.")
        if callable(models) and not isinstance(models, nn.Module):
            models = [models(i) for i in range(len(masks))]
        models = list(models)
        if len(models) != len(masks):
            raise ValueError(f"got {len(models)} models but {len(masks)} mask sets: give one mask set per model.")
        optimizer = optimizer.lower()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported: use one of {OPTIMIZERS}.")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD).")
        _check_architecture(models)

        self.num_models = len(models)
        self.optimizer = optimizer
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self._loss_fn = loss_fn if loss_fn is not None else cross_entropy
        self._output_fn = output_fn

        first = models[0]
        ref_param = next(first.parameters())
        self.device = torch.device(device) if device is not None else ref_param.device
        stacked_params, stacked_buffers = stack_module_state(models)
        trained = [n for n, p in first.named_parameters() if p.requires_grad]
        if not trained:
            raise ValueError("the models have no parameter with requires_grad=True: nothing to train.")
        dtypes = {stacked_params[n].dtype for n in trained}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"all trained parameters must share one floating dtype, got {sorted(map(str, dtypes))}.")
        self.dtype = next(iter(dtypes))

        # One flat buffer for all K x P trained values; parameter n is the contiguous block [K, *shape] at
        # offset K * (start of n), so each stacked parameter is a plain contiguous view and the optimizer runs on
        # whole buffers.
        k = self.num_models
        self._names = trained
        self._shapes = [tuple(stacked_params[n].shape[1:]) for n in trained]
        numels = [stacked_params[n][0].numel() for n in trained]
        self.numel_per_model = sum(numels)
        self._flat = torch.empty(k * self.numel_per_model, dtype=self.dtype, device=self.device)
        keep = torch.ones(k * self.numel_per_model, dtype=torch.bool, device=self.device)
        self.params: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._blocks: list[tuple[int, int]] = []
        start = 0
        for name, shape, n in zip(trained, self._shapes, numels):
            block = slice(k * start, k * (start + n))
            self.params[name] = self._flat[block].view(k, *shape)
            self.params[name].copy_(stacked_params[name].detach())
            self.masks[name] = keep[block].view(k, *shape)
            self._blocks.append((k * start, k * (start + n)))
            start += n
        named = dict(first.named_parameters())
        for i, arm_masks in enumerate(masks):
            for name, mask in (arm_masks or {}).items():
                if name not in self.params:
                    why = "is frozen (requires_grad=False)" if name in named else "is not a parameter of the model"
                    raise ValueError(f"mask {name!r} of arm {i} {why}: masks must name trained parameters.")
                if tuple(mask.shape) != tuple(self.params[name].shape[1:]):
                    raise ValueError(
                        f"mask {name!r} of arm {i} has shape {tuple(mask.shape)}, the parameter "
                        f"{tuple(self.params[name].shape[1:])}: the masks were made for another configuration."
                    )
                self.masks[name][i].copy_(mask.to(device=self.device, dtype=torch.bool))
        self._keep = keep
        self._pruned = ~keep
        # Weight decay per entry (1 or 0) when some trained parameters are exempt; None when it applies to all.
        self._decay: Optional[torch.Tensor] = None
        if decay_names is not None and set(trained) - set(decay_names):
            decay = set(decay_names)
            self._decay = torch.zeros(k * self.numel_per_model, dtype=self.dtype, device=self.device)
            for name, (a, b) in zip(trained, self._blocks):
                if name in decay:
                    self._decay[a:b] = 1.0
        # Frozen parameters and buffers are passed to every call, stacked; only the running statistics of
        # normalization layers are written (in place, by the forward in training mode).
        self._consts: dict[str, torch.Tensor] = {
            n: stacked_params[n].detach().to(self.device) for n in named if n not in self.params
        }
        self._consts.update({n: b.to(self.device) for n, b in stacked_buffers.items()})
        self._running = [n for n in running_stat_names(first) if n in self._consts]
        with torch.no_grad():
            zero_pruned_flat_([self._flat], self._pruned)

        # The skeleton whose forward is called with the stacked tensors: no storage of its own (meta device), so a
        # tensor left out of the call fails loudly instead of silently using stale weights.
        self._module = copy.deepcopy(first).to("meta")
        # Tied parameters (one tensor under several names) appear once in named_parameters(); map the other names.
        canonical = {id(p): n for n, p in first.named_parameters()}
        self._aliases = {
            n: canonical[id(p)]
            for n, p in first.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != n and canonical[id(p)] in self.params
        }

        # Optimizer state: flat buffers like the parameters; scalars as 0-dim device tensors (no host reads).
        self._lr = torch.tensor(float(lr), dtype=torch.float32, device=self.device)
        self._momentum_buf = torch.zeros_like(self._flat) if optimizer == "sgd" and self.momentum != 0 else None
        if optimizer in ("adam", "adamw"):
            self._exp_avg = torch.zeros_like(self._flat)
            self._exp_avg_sq = torch.zeros_like(self._flat)
            # float64: in float32, 1 - 0.999**t loses ~5 digits to cancellation (beta2 itself rounds to 0.99900001),
            # which shifts every early Adam update by ~1e-5 relative; these scalars cost nothing in float64.
            self._step = torch.zeros((), dtype=torch.float64, device=self.device)

        # Autograd leaves sharing the flat buffer's storage: the forward runs under vmap, the backward is plain
        # autograd from the K losses (cheaper on the host than vmap(grad(...)), the same gradients).
        self._leaves = {n: p.detach().requires_grad_() for n, p in self.params.items()}
        self._ones = torch.ones(self.num_models, dtype=self.dtype, device=self.device)
        self._loss_shared = vmap(self._loss, in_dims=(0, 0, None, None), randomness=randomness)
        self._loss_per_arm = vmap(self._loss, in_dims=(0, 0, 0, 0), randomness=randomness)
        self._forward_shared = vmap(self._logits, in_dims=(0, 0, None), randomness=randomness)
        self._forward_per_arm = vmap(self._logits, in_dims=(0, 0, 0), randomness=randomness)

    # ---- the functional model ------------------------------------------------------------------------------------

    def _logits(self, params: dict, consts: dict, x: torch.Tensor) -> torch.Tensor:
        if self._aliases:  # tied weights: every name of a shared tensor gets it (cheaper than tie_weights=True)
            params = {**params, **{alias: params[name] for alias, name in self._aliases.items()}}
        return self._output_fn(functional_call(self._module, (params, consts), (x,), tie_weights=False))

    def _loss(self, params: dict, consts: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._loss_fn(self._logits(params, consts, x), y)

    # ---- training ------------------------------------------------------------------------------------------------

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate, a 0-dim device tensor (read it with `float(...)`, which syncs)."""
        return self._lr

    def set_lr(self, lr: Union[float, torch.Tensor]) -> None:
        """Change the learning rate in place (no host sync; a captured step picks it up)."""
        self._lr.fill_(lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, per_arm: bool = False) -> torch.Tensor:
        """One optimizer step of all K networks; returns the K losses (a device tensor, not read back).

        Args:
            x, y: one batch for all networks (`[B, ...]`, `[B]`), or with `per_arm=True` one batch per network
                (`[K, B, ...]`, `[K, B]`), e.g. replicates with their own data order.
        """
        if not self._module.training:
            self._module.train()
        leaves = list(self._leaves.values())
        with torch.enable_grad():
            loss_fn = self._loss_per_arm if per_arm else self._loss_shared
            losses = loss_fn(self._leaves, self._consts, x, y)
            # The K losses are independent, so d(sum of losses)/d(network k's weights) is network k's gradient.
            grads = torch.autograd.grad(losses, leaves, grad_outputs=self._ones)
        with torch.no_grad():
            flat_grad = torch.cat([g.reshape(-1) for g in grads])
            zero_pruned_flat_([flat_grad], self._pruned)  # pruned weights get no gradient ...
            if self.max_grad_norm is not None:
                self._clip_(flat_grad)
            if self.optimizer == "sgd":
                self._sgd(flat_grad)
            else:
                self._adam(flat_grad)
            zero_pruned_flat_([self._flat], self._pruned)  # ... and stay exactly zero whatever the update did
        return losses.detach()

    def _add_l2_(self, g: torch.Tensor) -> torch.Tensor:
        if self._decay is None:
            return g.add_(self._flat, alpha=self.weight_decay)
        return g.addcmul_(self._flat, self._decay, value=self.weight_decay)

    def _clip_(self, g: torch.Tensor) -> None:
        """Scale each network's gradient to at most `max_grad_norm` (torch.nn.utils.clip_grad_norm_'s rule)."""
        k = self.num_models
        blocks = [g[a:b].view(k, -1) for a, b in self._blocks]
        norm = torch.stack([blk.square().sum(1) for blk in blocks]).sum(0).sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0).unsqueeze(1)
        for blk in blocks:
            blk.mul_(coef)

    def _sgd(self, g: torch.Tensor) -> None:
        # torch.optim.SGD (dampening=0): its first-step `buf = g` equals `buf = momentum * 0 + g` exactly.
        if self.weight_decay != 0:
            g = self._add_l2_(g)
        if self._momentum_buf is not None:
            buf = self._momentum_buf.mul_(self.momentum).add_(g)
            g = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
        self._flat.addcmul_(g, self._lr, value=-1.0)

    def _adam(self, g: torch.Tensor) -> None:
        # torch.optim.Adam/AdamW; the step count and bias corrections stay on the device (no host reads).
        beta1, beta2 = self.betas
        self._step.add_(1)
        if self.optimizer == "adamw" and self.weight_decay != 0:
            if self._decay is None:
                self._flat.mul_(1 - self._lr * self.weight_decay)
            else:
                self._flat.mul_(self._decay * (-self._lr * self.weight_decay) + 1)
        elif self.weight_decay != 0:
            g = self._add_l2_(g)
        self._exp_avg.lerp_(g, 1 - beta1)
        self._exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, self._step)
        bias_correction2 = 1 - torch.pow(beta2, self._step)
        step_size_neg = (self._lr.double() / bias_correction1).neg().to(self.dtype)
        # torch.optim.Adam's non-capturable form, lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), with the scalars kept
        # on the device. (Its capturable form divides by the learning rate, which is NaN at lr = 0: warm-up.)
        denom = (self._exp_avg_sq.sqrt() / bias_correction2.sqrt().to(self.dtype)).add_(self.eps)
        self._flat.add_((self._exp_avg / denom).mul_(step_size_neg))

    # ---- evaluation and results ----------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, x: torch.Tensor, per_arm: bool = False) -> torch.Tensor:
        """Eval-mode logits of all K networks for one batch: `[K, B, C]`."""
        was_training = self._module.training
        self._module.eval()
        try:
            fn = self._forward_per_arm if per_arm else self._forward_shared
            return fn(self.params, self._consts, x.to(self.device, non_blocking=True))
        finally:
            self._module.train(was_training)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> list[float]:
        """Accuracy of each network on (`x` `[N, ...]`, `y` `[N]`), in fixed-size chunks; one host read at the end."""
        return self.evaluate_loss_accuracy(x, y, batch_size)[1].tolist()

    @torch.no_grad()
    def evaluate_loss_accuracy(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per network, mean loss and accuracy over (`x`, `y`): two `[K]` device tensors (nothing read back).

        The loss is the per-example mean over the whole set (chunk means weighted by chunk size), as
        `Trainer.evaluate` reports it.
        """
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must hold the same, non-zero number of examples, got {len(x)} and {len(y)}.")
        loss_sum = torch.zeros(self.num_models, dtype=torch.float64, device=self.device)
        correct = torch.zeros(self.num_models, dtype=torch.int64, device=self.device)
        per_arm_loss = vmap(self._loss_fn, in_dims=(0, None))
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(self.device, non_blocking=True)
            yb = y[i : i + batch_size].to(self.device, non_blocking=True)
            logits = self.logits(xb)
            loss_sum += per_arm_loss(logits, yb).double() * len(yb)
            correct += (logits.argmax(-1) == yb).sum(-1)
        return loss_sum / len(x), correct.double() / len(x)

    # ---- per-network state: rewind points, arms joining a running pass --------------------------------------

    def _state_buffers(self) -> dict[str, torch.Tensor]:
        out = {"weights": self._flat}
        if self._momentum_buf is not None:
            out["momentum_buffer"] = self._momentum_buf
        if self.optimizer in ("adam", "adamw"):
            out["exp_avg"], out["exp_avg_sq"] = self._exp_avg, self._exp_avg_sq
        return out

    def arm_state(self, i: int) -> dict[str, torch.Tensor]:
        """Network i's trained weights and optimizer buffers, copied: keys `<buffer>/<parameter name>`.

        Buffers are `weights`, plus `momentum_buffer` (SGD with momentum) or `exp_avg`/`exp_avg_sq` (Adam); the
        shared step count is `step_count`. The running statistics of normalization layers are model state that a
        step changes, so they come as `weights/<buffer name>` (a rewind point or an arm joining a later phase needs
        them as much as the weights).
        """
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"network {i} does not exist: there are {self.num_models}.")
        k = self.num_models
        out = {}
        for kind, flat in self._state_buffers().items():
            for name, shape, (a, b) in zip(self._names, self._shapes, self._blocks):
                out[f"{kind}/{name}"] = flat[a:b].view(k, *shape)[i].detach().clone()
        for name in self._running:
            out[f"weights/{name}"] = self._consts[name][i].clone()
        return out

    @torch.no_grad()
    def load_arm_state(self, i: int, state: Mapping[str, torch.Tensor]) -> None:
        """Set network i's weights, running statistics and optimizer buffers from `arm_state`-style keys; missing
        ones stay as they are (zero for a fresh optimizer). Pruned entries are zeroed again afterwards."""
        k = self.num_models
        buffers = self._state_buffers()
        unknown = [key for key in state if key.split("/", 1)[0] not in buffers]
        if unknown:
            raise ValueError(
                f"state keys {unknown[:3]} do not fit optimizer={self.optimizer!r} (buffers {sorted(buffers)})."
            )
        for name, shape, (a, b) in zip(self._names, self._shapes, self._blocks):
            for kind, flat in buffers.items():
                value = state.get(f"{kind}/{name}")
                if value is not None:
                    flat[a:b].view(k, *shape)[i].copy_(value.to(self.device, self.dtype))
        for name in self._running:
            value = state.get(f"weights/{name}")
            if value is not None:  # keeps the buffer's own dtype (num_batches_tracked is an integer count)
                self._consts[name][i].copy_(value.to(self.device))
        zero_pruned_flat_([self._flat], self._pruned)
        for kind in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if kind in buffers:
                zero_pruned_flat_([buffers[kind]], self._pruned)  # no momentum may revive a pruned weight

    @property
    def step_count(self) -> int:
        """Adam's step count, shared by all networks (0 for SGD, which has none)."""
        return int(self._step.item()) if self.optimizer in ("adam", "adamw") else 0

    def set_step_count(self, step: int) -> None:
        if self.optimizer in ("adam", "adamw"):
            self._step.fill_(int(step))

    def mutable_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step writes (weights, running statistics, optimizer state, step count, lr): to snapshot
        and restore, e.g. around the warm-up steps a CUDA-graph capture needs."""
        out = list(self._state_buffers().values()) + [self._consts[n] for n in self._running] + [self._lr]
        if self.optimizer in ("adam", "adamw"):
            out.append(self._step)
        return out

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Network i's weights and buffers (copies), loadable with `model.load_state_dict`."""
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"network {i} does not exist: there are {self.num_models}.")
        out = {n: p[i].detach().clone() for n, p in self.params.items()}
        out.update({n: t[i].clone() for n, t in self._consts.items()})
        return out

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        """Every network's weights and buffers, in arm order (see `state_dict`)."""
        return [self.state_dict(i) for i in range(self.num_models)]

    @torch.no_grad()
    def count_violations(self) -> list[int]:
        """Per network, the masked-out weights that are not exactly zero (all 0 while the masks are enforced)."""
        bad = (self._flat != 0) & self._pruned
        per_arm = sum(bad[a:b].view(self.num_models, -1).sum(1) for a, b in self._blocks)
        return per_arm.tolist()

    def density(self) -> list[float]:
        """Per network, the fraction of masked entries kept, over the parameters that some arm masks."""
        masked = [n for n in self._names if not bool(self.masks[n].all())]
        if not masked:
            return [1.0] * self.num_models
        kept = sum(self.masks[n].reshape(self.num_models, -1).sum(1) for n in masked)
        total = sum(self.masks[n][0].numel() for n in masked)
        return (kept.double() / total).tolist()


def running_stat_names(model: nn.Module) -> list[str]:
    """The buffers a training-mode forward writes: running statistics of BatchNorm/InstanceNorm layers."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(module, buffer, None) is not None:
                    names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def _check_architecture(models: Sequence[nn.Module]) -> None:
    """Same parameter/buffer names and shapes in every model; running statistics the step can keep on the device."""
    for model in models:
        for name, module in model.named_modules():
            if (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.track_running_stats
                and module.momentum is None
            ):
                raise NotImplementedError(
                    f"{type(model).__name__}.{name} is a {type(module).__name__} with momentum=None (a cumulative "
                    "average): its update factor 1 / num_batches_tracked is read back to the host every step, which "
                    "batched training (and a CUDA graph) cannot do. Give it a momentum (0.1 is PyTorch's default) or "
                    "train it one network at a time with TicketTrainer (backend='trainer')."
                )

    def signature(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
        params = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
        buffers = [(n, tuple(b.shape), b.dtype, False) for n, b in model.named_buffers()]
        return params + buffers

    reference = signature(models[0])
    for i, model in enumerate(models[1:], start=1):
        if type(model) is not type(models[0]) or signature(model) != reference:
            raise ValueError(
                f"model {i} ({type(model).__name__}) does not have model 0's parameters and buffers "
                f"({type(models[0]).__name__}): all networks trained together must share one architecture."
            )
