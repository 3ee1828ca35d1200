"""Train several masked networks in lockstep for one level: the plan, the data order, evaluation, graph replay.

`train_lockstep` is the engine under `hf_tickets.lottery.experiment`: it takes K arms (start weights, masks,
optimizer state, the step each one starts at) and trains them together with `BatchedMaskedTraining` from their
start step to the end of the level, evaluating every `eval_steps`. Arms that start later (a late-rewound trunk at
step k beside a reinit control at step 0) join the pass when it reaches their step, with their own state.

Everything a step needs comes from device tensors indexed by a device step counter: the batch indices (one
table per replicate, `[steps, batch]`), the learning rate (the Trainer's schedule, precomputed). So one step
reads nothing back to the host and on CUDA the whole step is captured once in a CUDA graph and replayed; the
host only wakes up to evaluate. BatchNorm running statistics are per-arm state like the weights: the captured
step updates them in place on the engine's static buffers, the capture's warm-up steps are undone on them, and an
arm carries them into the next phase when a late arm joins (`BatchedMaskedTraining.arm_state`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .batched import BatchedMaskedTraining

# The torch.optim class Trainer builds for `TrainingArguments.optim` -> the BatchedMaskedTraining rule that computes
# the same update on stacked parameters (tested against torch.optim in tests/test_experiment.py).
OPTIM_RULES = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}
SUPPORTED_OPTIM = ["adamw_torch", "adamw_torch_fused", "sgd"]


@dataclass
class TrainPlan:
    """What one level of training does, read from `TrainingArguments` so both engines train the same way.

    Attributes:
        total_steps: optimizer steps per level.
        batch_size: examples per step (`per_device_train_batch_size`; every batch is full, see `batch_tables`).
        lrs: the learning rate of every step, as the Trainer's scheduler gives it.
        optimizer, momentum, nesterov, weight_decay, betas, eps: the update rule (`BatchedMaskedTraining`).
        max_grad_norm: per-network gradient clipping (0 = none).
        eval_steps: evaluate every this many steps and at the last one (None = only at the last one).
        seed: seed of the data order (replicate r uses seed + r).
        decay_names: parameters weight decay applies to (Trainer exempts biases and LayerNorm weights).
    """

    total_steps: int
    batch_size: int
    lrs: list[float]
    optimizer: str = "adamw"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.0
    eval_steps: Optional[int] = None
    seed: int = 0
    decay_names: Optional[set] = None
    eval_batch_size: int = 1000

    def eval_points(self, start: int) -> list[int]:
        """Steps (after which) to evaluate, for an arm that starts at `start`."""
        points = set()
        if self.eval_steps:
            points.update(range(self.eval_steps, self.total_steps + 1, self.eval_steps))
        points.add(self.total_steps)
        return sorted(p for p in points if p > start)


def plan_from_training_args(args, model: nn.Module, num_train_examples: int, decay_names=None) -> TrainPlan:
    """The `TrainPlan` that matches what `Trainer.train` would do with `args`, or a ValueError naming the field."""
    from transformers import Trainer

    # The optimizer Trainer would build (class and arguments, optim_args parsed by Trainer itself).
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    rule = OPTIM_RULES.get(optimizer_cls)
    if rule is None:
        optim = getattr(args.optim, "value", args.optim)
        raise ValueError(
            f"TrainingArguments.optim={optim!r} ({optimizer_cls.__name__}) is not supported by the lockstep backend: "
            f"use one of {SUPPORTED_OPTIM} (or backend='trainer')."
        )
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            "the batched engine takes one batch per optimizer step: set TrainingArguments."
            f"gradient_accumulation_steps=1 (got {args.gradient_accumulation_steps}) or use engine='trainer'."
        )
    if args.fp16 or args.bf16:
        raise ValueError(
            "the batched engine trains in float32: set fp16=False and bf16=False, or use engine='trainer'."
        )
    scheduler_type = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if scheduler_type == "reduce_lr_on_plateau":
        raise ValueError(
            "TrainingArguments.lr_scheduler_type='reduce_lr_on_plateau' reacts to evaluation results, which the "
            "batched engine's precomputed schedule cannot: choose another schedule or use engine='trainer'."
        )
    batch = int(args.per_device_train_batch_size)
    per_epoch = num_train_examples // batch if args.dataloader_drop_last else math.ceil(num_train_examples / batch)
    per_epoch = max(per_epoch, 1)
    if args.max_steps and args.max_steps > 0:
        total = int(args.max_steps)
    else:
        total = int(math.ceil(args.num_train_epochs * per_epoch))
    extra = {k: v for k, v in optimizer_kwargs.items() if k not in ("lr", "betas", "eps", "momentum", "nesterov")}
    extra.pop("fused", None)  # a kernel choice, not a different update
    extra.pop("foreach", None)
    if any(extra.values()):
        raise ValueError(
            f"TrainingArguments.optim_args={args.optim_args!r} gives {optimizer_cls.__name__} {extra}: the lockstep "
            "backend supports momentum and nesterov only (dampening 0)."
        )
    momentum = float(optimizer_kwargs.get("momentum", 0.0))
    nesterov = bool(optimizer_kwargs.get("nesterov", False))
    betas = tuple(float(b) for b in optimizer_kwargs.get("betas", (args.adam_beta1, args.adam_beta2)))
    eps = float(optimizer_kwargs.get("eps", args.adam_epsilon))
    # The learning rate of each step, from the Trainer's own scheduler on a stand-in optimizer.
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    scheduler = trainer_scheduler(args, stand_in, total)
    lrs = []
    for _ in range(total):
        lrs.append(float(stand_in.param_groups[0]["lr"]))
        stand_in.step()
        scheduler.step()
    eval_strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    eval_steps = None
    if eval_strategy == "steps":
        # As Trainer: eval_steps defaults to logging_steps, and a value below 1 is a fraction of training.
        every = args.eval_steps if args.eval_steps else args.logging_steps
        eval_steps = max(int(math.ceil(total * every)) if every < 1 else int(every), 1)
    elif eval_strategy == "epoch":
        eval_steps = per_epoch
    return TrainPlan(
        total_steps=total,
        batch_size=batch,
        lrs=lrs,
        optimizer=rule,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=float(args.weight_decay),
        betas=betas,
        eps=eps,
        max_grad_norm=float(args.max_grad_norm or 0.0),
        eval_steps=eval_steps,
        seed=int(args.seed),
        decay_names=set(decay_names) if decay_names is not None else None,
        eval_batch_size=int(args.per_device_eval_batch_size),
    )


def trainer_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int):
    """The LR scheduler `Trainer` builds for `args` over `total_steps`, on `optimizer`."""
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )


def batch_tables(plan: TrainPlan, num_examples: int, replicates: int, device) -> torch.Tensor:
    """Batch indices `[replicates, steps, batch]`: consecutive slices of a fresh permutation per epoch.

    Every batch is full (the permutations are concatenated, so a batch may straddle two epochs), which keeps the
    step's shapes fixed; each replicate has its own order (seed + r), and every level and arm of a replicate sees
    the same order, as `Trainer` with a fixed seed does.
    """
    needed = plan.total_steps * plan.batch_size
    tables = []
    for r in range(replicates):
        gen = torch.Generator().manual_seed(plan.seed + r)
        epochs = math.ceil(needed / num_examples)
        order = torch.cat([torch.randperm(num_examples, generator=gen) for _ in range(epochs)])[:needed]
        tables.append(order.view(plan.total_steps, plan.batch_size))
    return torch.stack(tables).to(device)


@dataclass
class ArmStart:
    """One network of a lockstep pass.

    Attributes:
        weights: its start weights (a state_dict: parameters and buffers).
        masks: parameter name -> bool mask (None = dense).
        start_step: the step it starts at (k for a late-rewound arm); the LR schedule and data order resume there.
        optimizer_state: `BatchedMaskedTraining.arm_state` keys (momentum/Adam buffers at `start_step`), or None
            for a fresh optimizer.
        replicate: which replicate's data order it follows.
    """

    weights: dict
    masks: Optional[dict] = None
    start_step: int = 0
    optimizer_state: Optional[dict] = None
    replicate: int = 0


@dataclass
class ArmResult:
    """What a lockstep pass returns per arm: final weights (CPU), eval history, mean train loss, snapshot."""

    weights: dict
    history: list = field(default_factory=list)
    train_loss: float = float("nan")
    snapshot: Optional[dict] = None


@dataclass
class SplitTensors:
    """An evaluation or training split as two device tensors."""

    x: torch.Tensor
    y: torch.Tensor


def train_lockstep(
    template: nn.Module,
    arms: list[ArmStart],
    plan: TrainPlan,
    train: SplitTensors,
    eval_splits: dict[str, SplitTensors],
    tables: torch.Tensor,
    snapshot_step: Optional[int] = None,
    use_cuda_graph: Optional[bool] = None,
    on_eval: Optional[Callable[[int, list[dict]], None]] = None,
) -> list[ArmResult]:
    """Train `arms` together to `plan.total_steps`; see the module docstring.

    Args:
        template: a module of the architecture (copied, never changed).
        tables: `batch_tables(...)`, on the training device.
        snapshot_step: also return each arm's `arm_state` (weights, running statistics, optimizer buffers) after
            this step.
        use_cuda_graph: capture the step in a CUDA graph (default: when training on CUDA).
        on_eval: called with (step, one metrics dict per evaluated arm) after each evaluation.
    """
    if not arms:
        raise ValueError("train_lockstep needs at least one arm.")
    device = train.x.device
    for i, arm in enumerate(arms):
        if not 0 <= arm.start_step < plan.total_steps:
            raise ValueError(f"arm {i} starts at step {arm.start_step}, outside the level's {plan.total_steps} steps.")
        if arm.replicate >= tables.shape[0]:
            raise ValueError(f"arm {i} follows replicate {arm.replicate}, but there are {tables.shape[0]} tables.")
    results = [ArmResult(weights={}) for _ in arms]
    loss_sums = [0.0] * len(arms)
    starts = sorted({arm.start_step for arm in arms})
    graph = use_cuda_graph if use_cuda_graph is not None else device.type == "cuda"
    active: list[int] = []
    trainer: Optional[BatchedMaskedTraining] = None
    run: Optional[_Run] = None
    for phase, start in enumerate(starts):
        end = starts[phase + 1] if phase + 1 < len(starts) else plan.total_steps
        carried, step_count = {}, None
        if trainer is not None and run is not None:  # arms already training carry their state into this phase
            carried = {i: trainer.arm_state(j) for j, i in enumerate(active)}
            step_count = trainer.step_count
            for j, value in enumerate(run.loss_sum.tolist()):
                loss_sums[active[j]] += value
        active = active + [i for i, arm in enumerate(arms) if arm.start_step == start]
        trainer = _build(template, [arms[i] for i in active], plan, device)
        for j, i in enumerate(active):
            state = carried.get(i, arms[i].optimizer_state)
            if state is not None:
                trainer.load_arm_state(j, state)
        _check_step_counts(
            trainer, [arms[i] for i in active], [j for j, i in enumerate(active) if i in carried], start
        )
        trainer.set_step_count(step_count if step_count is not None else start)
        replicate_of = torch.tensor([arms[i].replicate for i in active], device=device)
        run = _Run(trainer, plan, train, tables, replicate_of, start, device)
        step_fn = run.capture() if graph else run.step
        evals = set(plan.eval_points(start))
        targets = {p for p in evals if p <= end} | {end}
        if snapshot_step is not None and start < snapshot_step <= end:
            targets.add(snapshot_step)
        step = start
        for target in sorted(targets):
            for _ in range(target - step):
                step_fn()
            step = target
            if target == snapshot_step:
                for j, i in enumerate(active):
                    results[i].snapshot = trainer.arm_state(j)
            if target in evals:
                rows = _evaluate(trainer, eval_splits, plan, target)
                for j, i in enumerate(active):
                    results[i].history.append(rows[j])
                if on_eval is not None:
                    on_eval(target, [dict(row, arm=i) for i, row in zip(active, rows)])
    keys = set(template.state_dict())
    for j, value in enumerate(run.loss_sum.tolist()):
        i = active[j]
        loss_sums[i] += value
        results[i].train_loss = loss_sums[i] / max(plan.total_steps - arms[i].start_step, 1)
        results[i].weights = {n: t.cpu() for n, t in trainer.state_dict(j).items() if n in keys}
    return results


def _build(template: nn.Module, arms: list[ArmStart], plan: TrainPlan, device) -> BatchedMaskedTraining:
    models = []
    for arm in arms:
        model = copy.deepcopy(template)
        load_weights_(model, arm.weights)
        models.append(model.to(device))
    return BatchedMaskedTraining(
        models,
        [arm.masks for arm in arms],
        optimizer=plan.optimizer,
        lr=plan.lrs[0],
        momentum=plan.momentum,
        nesterov=plan.nesterov,
        weight_decay=plan.weight_decay,
        betas=plan.betas,
        eps=plan.eps,
        device=device,
        max_grad_norm=plan.max_grad_norm or None,
        decay_names=plan.decay_names,
    )


def load_weights_(model: nn.Module, weights: dict) -> None:
    """`load_state_dict` that accepts files without the second name of a tied weight (safetensors drops it)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"weights hold keys the model does not have: {sorted(unexpected)[:5]}")
    state = model.state_dict(keep_vars=True)
    loaded_ids = {id(state[name]) for name in weights if name in state}
    untied = [name for name in missing if id(state[name]) not in loaded_ids]
    if untied:
        raise ValueError(f"weights lack the model's {sorted(untied)[:5]}")


def _check_step_counts(trainer, arms: list[ArmStart], carried: list[int], start: int) -> None:
    """Adam's step count is shared: an arm joining at step s > 0 must bring optimizer state from step s."""
    if trainer.optimizer == "sgd" or start == 0:
        return
    fresh = [j for j, arm in enumerate(arms) if j not in carried and arm.optimizer_state is None]
    if fresh:
        raise ValueError(
            f"{len(fresh)} arm(s) join at step {start} with a fresh Adam optimizer, but the pass shares one step "
            "count: give them the optimizer state of that step (rewind point) or start them at step 0."
        )


class _Run:
    """One phase of a pass: the step body (batch from the tables, LR from the schedule) and its CUDA graph."""

    def __init__(self, trainer, plan, train, tables, replicate_of, start, device) -> None:
        self.trainer, self.train, self.tables = trainer, train, tables
        self.replicate_of = replicate_of
        reps = replicate_of.tolist()
        self.shared = len(set(reps)) == 1  # one data order for all arms: one batch, no per-arm gather
        self.first_replicate = reps[0]
        self.lrs = torch.tensor(plan.lrs, dtype=torch.float32, device=device)
        self.counter = torch.full((1,), start, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros(trainer.num_models, dtype=torch.float64, device=device)

    def step(self) -> None:
        rows = self.tables.index_select(1, self.counter).squeeze(1)  # [replicates, batch]
        if self.shared:
            idx = rows[self.first_replicate]
            x, y = self.train.x.index_select(0, idx), self.train.y.index_select(0, idx)
        else:
            idx = rows.index_select(0, self.replicate_of)  # [K, batch]
            x, y = self.train.x[idx], self.train.y[idx]
        self.trainer.lr.copy_(self.lrs.index_select(0, self.counter).squeeze(0))
        losses = self.trainer.step(x, y, per_arm=not self.shared)
        self.loss_sum.add_(losses.double())
        self.counter.add_(1)

    def capture(self) -> Callable[[], None]:
        """The step captured in a CUDA graph; the warm-up steps capture needs are undone before returning."""
        state = [t.clone() for t in self.trainer.mutable_tensors() + [self.counter, self.loss_sum]]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        with torch.no_grad():
            for target, saved in zip(self.trainer.mutable_tensors() + [self.counter, self.loss_sum], state):
                target.copy_(saved)
        self._graph = graph  # keep it (and its memory pool) alive with the run
        return graph.replay


def _evaluate(trainer: BatchedMaskedTraining, splits: dict[str, SplitTensors], plan: TrainPlan, step: int) -> list:
    values = {}
    for name, split in splits.items():
        loss, acc = trainer.evaluate_loss_accuracy(split.x, split.y, batch_size=plan.eval_batch_size)
        values[name] = (loss.tolist(), acc.tolist())
    rows = []
    for j in range(trainer.num_models):
        row = {"step": step}
        for name, (loss, acc) in values.items():
            row[name] = {"loss": loss[j], "accuracy": acc[j]}
        rows.append(row)
    return rows
