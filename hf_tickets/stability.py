"""Linear mode connectivity: the instability analysis of Frankle et al. 2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis".

From one rewind point (a Trainer checkpoint at step k: weights, optimizer, LR-scheduler position, RNG states), two
copies of the network train to the same step with different data orders and nothing else changed. The test error
is measured at evenly spaced points of the straight line between their final weights; the instability is the
largest rise of that error over the mean of the two endpoints' errors. A network is *stable* at k when the
instability is about zero: SGD noise after step k no longer changes which linearly connected minimum it reaches.

Choices, and why:
- Copies train through `TicketTrainer` resumed from the rewind point (`Trainer.train(resume_from_checkpoint=...)`),
  the same path the lottery's Trainer backend takes, so optimizer state, schedule position and RNG states are the
  run's own. The data order is the only difference: `TrainingArguments.data_seed`, which seeds the sampler that
  accelerate puts in the train dataloader (it adds the epoch to it, hence the check that two seeds are further apart
  than the epochs trained). The LR schedule keeps the rewind point's length (its `trainer_state.json` `max_steps`);
  training shorter stops early on that schedule rather than squeezing it.
- Masks (an IMP subnetwork's) are enforced while the copies train and written again after interpolation: both
  endpoints hold exact zeros there, so every point of the path does.
- Frankle et al. interpolate all weights and evaluate. Interpolated BatchNorm running statistics do not describe the
  interpolated network's activations (they are not linear in the weights), which inflates the error in the middle
  of the path for reasons unrelated to the loss landscape; recomputing them on training batches at each point is
  the usual remedy (Garipov et al. 2018; `torch.optim.swa_utils.update_bn`). `batchnorm="auto"` recomputes for
  models with BatchNorm and interpolates otherwise (there is nothing to recompute); the choice is recorded.

`instability_sweep` is the part-2 helper: the instability of an IMP run's subnetwork (a level's masks) rewound to
each of several steps k, where the rewind points other than the run's own are made by replaying level 0 from
theta_0 (`make_rewind_points`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SaveStrategy, set_seed

from .checkpoints import load_saved_weights
from .files import MASKS_NAME, WEIGHTS_NAME, write_json_atomic
from .lottery.layout import (
    PICKLED_ARGS_NAME,
    finished_levels,
    init_weights_path,
    level_dir,
    replicate_roots,
    rewind_point_dir,
)
from .lottery.lockstep import load_weights_
from .lottery.metrics import accuracy
from .lottery.rewind import copy_checkpoint, rewind_point_step, save_rewind_point
from .masks import MaskSet
from .run_log import run_console
from .trainer import TicketTrainer

logger = logging.getLogger(__name__)

DEFAULT_POINTS = 30  # interpolation points, as Frankle et al. 2020 use
DEFAULT_DATA_SEEDS = (0, 1_000_003)  # far apart: accelerate's sampler seeds epoch e with data_seed + e
DEFAULT_BN_BATCHES = 100  # training batches that recompute BatchNorm statistics at each point
BATCHNORM_MODES = ("auto", "recompute", "interpolate")
RESULT_NAME = "stability.json"
PLOT_NAME = "stability.png"
SWEEP_NAME = "stability_sweep.json"
SWEEP_PLOT_NAME = "stability_sweep.png"
COPY_PREFIX = "copy_"  # the trained endpoints: copy_0/, copy_1/ (a model folder each)
MASKS_ATTR = "hf_tickets_masks"  # masks apply_sparsity attaches to a model (sparsify.MASKS_ATTR)


@dataclass
class StabilityResult:
    """The error and loss along the linear path between two copies trained from one rewind point.

    Attributes:
        alphas: interpolation coefficients, 0 = copy 0, 1 = copy 1.
        error, loss: test error (1 - top-1 accuracy) and mean loss at each alpha.
        instability: max error along the path minus the mean of the endpoints' errors (Frankle et al. 2020).
        loss_instability: the same for the loss.
        start_step, end_step, schedule_steps: the rewind point's step, the step both copies trained to, the length
            of the LR schedule they follow.
        batchnorm: "recompute" (statistics recomputed on `bn_batches` training batches at each point) or
            "interpolate" (buffers interpolated like weights).
    """

    rewind_point: str
    start_step: int
    end_step: int
    schedule_steps: int
    data_seeds: list[int]
    alphas: list[float]
    error: list[float]
    loss: list[float]
    instability: float
    loss_instability: float
    eval_split: Optional[str]
    eval_examples: int
    batchnorm: str
    bn_batches: int
    sparsity: float
    copies: list[str] = field(default_factory=list)
    produced_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- inputs ---------------------------------------------------------------------------------------------------------


def check_rewind_point(folder: str) -> int:
    """The step a rewind point holds; a ValueError naming what is missing when `folder` is not one."""
    if not os.path.isdir(folder):
        raise ValueError(f"rewind point {folder!r} is not a folder: pass a Trainer checkpoint folder (checkpoint-k).")
    missing = [
        n for n in (WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME) if not os.path.isfile(os.path.join(folder, n))
    ]
    if missing:
        raise ValueError(
            f"{folder!r} is not a rewind point: it lacks {missing} (a rewind point is a Trainer checkpoint folder "
            "such as an IMP run's rewind_point/ or checkpoint-k with model.safetensors, optimizer.pt and "
            "trainer_state.json)."
        )
    return int(rewind_point_step(folder) or 0)


def _check_seeds(data_seeds: Sequence[int]) -> tuple[int, int]:
    seeds = tuple(data_seeds)
    if len(seeds) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"data_seeds must be two ints >= 0 (one data order per copy), got {data_seeds!r}.")
    return seeds  # type: ignore[return-value]


def check_points(points: int) -> None:
    """Points on the path, endpoints included: at least 2."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2 (the path's two endpoints at least), got {points!r}.")


def _resolve_masks(masks: Union[MaskSet, str, None], rewind_point: str) -> Optional[MaskSet]:
    """Explicit masks (a MaskSet or a folder/file), else the rewind point's own masks.safetensors, else none."""
    if isinstance(masks, MaskSet):
        return masks
    if masks is not None:
        return MaskSet.load(masks)
    if os.path.isfile(os.path.join(rewind_point, MASKS_NAME)):
        return MaskSet.load(rewind_point)
    return None


def _eval_dataset(trainer: Trainer, split: Optional[str]):
    """(name, dataset) to measure the error on: `split` of a dict of eval sets (default "test"), or the one set."""
    data = trainer.eval_dataset
    if data is None:
        raise ValueError("the trainer has no eval_dataset: the error along the path is measured on it.")
    if isinstance(data, dict):
        name = split or ("test" if "test" in data else next(iter(data)))
        if name not in data:
            raise ValueError(f"eval split {name!r} is not one of the trainer's eval sets {sorted(data)}.")
        return name, data[name]
    if split is not None:
        raise ValueError(f"eval split {split!r} was asked for, but the trainer has one unnamed eval_dataset.")
    return None, data


def schedule_length(trainer: Trainer) -> int:
    """Optimizer steps of the trainer's whole schedule (TrainingArguments.max_steps, or its epochs)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    return int(math.ceil(args.num_train_epochs * max(batches // args.gradient_accumulation_steps, 1)))


def _steps_per_epoch(trainer: Trainer) -> int:
    return max(len(trainer.get_train_dataloader()) // trainer.args.gradient_accumulation_steps, 1)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---- training the two copies ----------------------------------------------------------------------------------------


def _bare_copy(model: nn.Module) -> nn.Module:
    """The architecture, on the CPU, without masks that `apply_sparsity` attached (masks are passed explicitly)."""
    clone = copy.deepcopy(model).cpu()
    clone.__dict__.pop(MASKS_ATTR, None)
    return clone


def _quiet_args(trainer: Trainer, output_dir: str, **changes: Any):
    """The trainer's TrainingArguments for a side run: own folder, no evaluation, saving or reporting."""
    args = copy.deepcopy(trainer.args)
    args.output_dir = output_dir
    args.eval_strategy = IntervalStrategy.NO
    args.save_strategy = SaveStrategy.NO
    args.load_best_model_at_end = False
    args.push_to_hub = False
    args.report_to = []
    args.save_only_model = False  # checkpoints must hold the optimizer and scheduler
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def _side_trainer(trainer: Trainer, model: nn.Module, args, masks: Optional[MaskSet]) -> TicketTrainer:
    """A `TicketTrainer` on the caller's data and collator, enforcing `masks` (plain Trainer when there are none)."""
    side = TicketTrainer(
        model=model,
        args=args,
        train_dataset=trainer.train_dataset,
        data_collator=trainer.data_collator,
        processing_class=trainer.processing_class,
        masks=masks,
    )
    side.card_charts = False
    return side


class _StartFrom(TrainerCallback):
    """At train begin, after Trainer restored the checkpoint: its weights by name (Trainer's own loading skips
    renamed tensors, see checkpoints.load_saved_weights), then the masks on weights and optimizer state."""

    def __init__(self, trainer: TicketTrainer, folder: str) -> None:
        self.trainer, self.folder = trainer, folder

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        device = next(model.parameters()).device
        load_weights_(model, {k: v.to(device) for k, v in load_saved_weights(self.folder, model).items()})
        if self.trainer.sparsity_callback is not None:
            self.trainer.sparsity_callback.enforce_now(kwargs.get("optimizer") or self.trainer.optimizer)


class _StopAt(TrainerCallback):
    """Ends training after step `step`, leaving the LR schedule's length as it is."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def train_copy(
    trainer: Trainer,
    rewind_point: str,
    folder: str,
    data_seed: int,
    end_step: int,
    schedule_steps: int,
    masks: Optional[MaskSet] = None,
) -> dict[str, torch.Tensor]:
    """Train one copy from `rewind_point` to `end_step` with data order `data_seed`; save it in `folder` and return
    its state_dict (on the CPU)."""
    args = _quiet_args(trainer, folder, data_seed=data_seed, max_steps=schedule_steps)
    side = _side_trainer(trainer, _bare_copy(trainer.model), args, masks)
    side.add_callback(_StartFrom(side, rewind_point))
    if end_step < schedule_steps:
        side.add_callback(_StopAt(end_step))
    with run_console(side, os.path.dirname(folder)):  # per-step dicts to <analysis>/train_log.jsonl, not the console
        side.train_once(resume_from_checkpoint=rewind_point, restore_masks=False)
        if side.state.global_step != end_step:
            raise RuntimeError(
                f"copy with data_seed={data_seed} ended at step {side.state.global_step}, not {end_step}."
            )
        side.save_model(folder)
    pickled = os.path.join(folder, PICKLED_ARGS_NAME)  # nothing pickled stays in a model folder
    if os.path.isfile(pickled):
        os.remove(pickled)
    return {k: v.detach().cpu().clone() for k, v in side.model.state_dict().items()}


# ---- the path -------------------------------------------------------------------------------------------------------


def interpolate_weights(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], alpha: float, masks: Optional[MaskSet] = None
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * first + alpha * second for floating tensors (exactly `first` at 0 and `second` at 1); other
    tensors (BatchNorm's num_batches_tracked) are taken from `first`. Masked entries are written as zeros."""
    if set(first) != set(second):
        raise ValueError(f"the two state_dicts differ in keys: {sorted(set(first) ^ set(second))[:5]}")
    out = {}
    for name, a in first.items():
        b = second[name]
        value = torch.lerp(a, b.to(a.dtype), float(alpha)) if a.is_floating_point() else a.clone()
        if masks is not None and name in masks:
            value = value.masked_fill(~masks[name].to(device=value.device, dtype=torch.bool), 0)
        out[name] = value
    return out


class _Forward(nn.Module):
    """`update_bn` calls model(batch); transformers models take the batch's fields as keywords."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return self.model(**batch)


def recompute_batchnorm_(model: nn.Module, batches: Iterable[dict]) -> None:
    """Reset every BatchNorm's running statistics and recompute them as the plain average over `batches`
    (train-mode forwards without gradients; `torch.optim.swa_utils.update_bn`)."""
    from torch.optim.swa_utils import update_bn

    update_bn(batches, _Forward(model))


def _bn_batches(trainer: Trainer, count: int) -> list[dict]:
    """The first `count` batches of one fixed training order (the same at every point of the path), on the device."""
    loader = trainer.get_train_dataloader()
    device = trainer.args.device
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for batch in islice(loader, count)
    ]


class PathEvaluator:
    """Evaluates interpolated weights with `Trainer.evaluate` (the caller's collator, batch size and precision)."""

    def __init__(self, trainer: Trainer, folder: str, dataset, batchnorm: str, bn_batches: int) -> None:
        self.model = _bare_copy(trainer.model)
        args = _quiet_args(trainer, folder, data_seed=0)  # the BatchNorm batches: one fixed order
        self.trainer = Trainer(
            model=self.model,
            args=args,
            train_dataset=trainer.train_dataset,
            data_collator=trainer.data_collator,
            processing_class=trainer.processing_class,
            compute_metrics=accuracy,
        )
        for callback in (PrinterCallback, ProgressCallback):  # one line per point would bury the table
            self.trainer.remove_callback(callback)
        self.dataset = dataset
        self.batches = _bn_batches(self.trainer, bn_batches) if batchnorm == "recompute" else None

    def __call__(self, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(error, loss) of the model holding `weights`."""
        device = next(self.model.parameters()).device
        load_weights_(self.model, {k: v.to(device) for k, v in weights.items()})
        if self.batches is not None:
            recompute_batchnorm_(self.model, self.batches)
        metrics = self.trainer.evaluate(eval_dataset=self.dataset, metric_key_prefix="eval")
        return 1.0 - float(metrics["eval_accuracy"]), float(metrics["eval_loss"])


def _rise(values: list[float]) -> float:
    return max(values) - (values[0] + values[-1]) / 2


# ---- the analysis ---------------------------------------------------------------------------------------------------


def instability(
    trainer: Trainer,
    rewind_point: str,
    output_dir: str,
    *,
    data_seeds: Sequence[int] = DEFAULT_DATA_SEEDS,
    points: int = DEFAULT_POINTS,
    max_steps: Optional[int] = None,
    masks: Union[MaskSet, str, None] = None,
    eval_split: Optional[str] = None,
    batchnorm: str = "auto",
    bn_batches: int = DEFAULT_BN_BATCHES,
    plot: bool = True,
) -> StabilityResult:
    """Train two copies from `rewind_point` with different data orders and measure the error along the line
    between them (Frankle et al. 2020's instability analysis).

    Args:
        trainer: a `Trainer` / `TicketTrainer` that describes the experiment: its model's architecture, its
            TrainingArguments (optimizer, batch size, schedule), train_dataset, collator and eval_dataset (a dict of
            sets is fine: `eval_split` picks one, default "test"). It is not trained itself.
        rewind_point: a Trainer checkpoint folder at step k (an IMP run's `rewind_point/`, a `checkpoint-k`).
        output_dir: receives `copy_0/`, `copy_1/` (the trained endpoints), `stability.json` and `stability.png`.
        data_seeds: the copies' `TrainingArguments.data_seed`s; equal seeds train identical copies (zero
            instability).
        points: points on the path, endpoints included (>= 2).
        max_steps: the global step both copies train to (default: the end of the rewind point's schedule).
        masks: masks to keep while training and along the path (a MaskSet, or a folder or masks file: an IMP
            level's); default the rewind point's own masks.safetensors, else dense.
        batchnorm: "auto" (recompute for models with BatchNorm), "recompute" or "interpolate".
        bn_batches: training batches that recompute BatchNorm statistics at each point.
        plot: also draw error and loss against alpha (stability.png).
    """
    check_points(points)
    seeds = _check_seeds(data_seeds)
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm={batchnorm!r} is unknown: use one of {list(BATCHNORM_MODES)}.")
    if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1:
        raise ValueError(f"bn_batches must be an int >= 1, got {bn_batches!r}.")
    start = check_rewind_point(rewind_point)
    recorded = TrainerState.load_from_json(os.path.join(rewind_point, TRAINER_STATE_NAME)).max_steps
    schedule = int(recorded) if recorded and recorded > 0 else schedule_length(trainer)
    end = schedule if max_steps is None else max_steps
    if isinstance(end, bool) or not isinstance(end, int) or not start < end <= schedule:
        raise ValueError(
            f"max_steps={max_steps!r}: the copies must train past the rewind point's step {start} and at most to the "
            f"end of its schedule ({schedule} steps); pass a step in ({start}, {schedule}]."
        )
    epochs = math.ceil(end / _steps_per_epoch(trainer))
    if seeds[0] != seeds[1] and abs(seeds[0] - seeds[1]) <= epochs:
        raise ValueError(
            f"data_seeds {list(seeds)} are closer than the {epochs} epochs trained: accelerate's sampler orders epoch "
            "e with data_seed + e, so the copies would share epochs' orders; pick seeds further apart."
        )
    split, dataset = _eval_dataset(trainer, eval_split)
    masks = _resolve_masks(masks, rewind_point)
    mode = batchnorm if batchnorm != "auto" else ("recompute" if has_batchnorm(trainer.model) else "interpolate")

    os.makedirs(output_dir, exist_ok=True)
    folders = [os.path.join(output_dir, f"{COPY_PREFIX}{i}") for i in range(2)]
    states = [train_copy(trainer, rewind_point, f, s, end, schedule, masks) for f, s in zip(folders, seeds)]
    scratch = os.path.join(output_dir, "eval.tmp")  # Trainer wants an output_dir; evaluation writes nothing there
    evaluator = PathEvaluator(trainer, scratch, dataset, mode, bn_batches)
    alphas = [i / (points - 1) for i in range(points)]
    errors, losses = [], []
    for alpha in alphas:
        error, loss = evaluator(interpolate_weights(states[0], states[1], alpha, masks))
        errors.append(error)
        losses.append(loss)
        logger.info("alpha %.3f: error %.4f, loss %.4f", alpha, error, loss)
    shutil.rmtree(scratch, ignore_errors=True)
    result = StabilityResult(
        rewind_point=os.path.abspath(rewind_point),
        start_step=start,
        end_step=end,
        schedule_steps=schedule,
        data_seeds=list(seeds),
        alphas=alphas,
        error=errors,
        loss=losses,
        instability=_rise(errors),
        loss_instability=_rise(losses),
        eval_split=split,
        eval_examples=len(dataset),
        batchnorm=mode,
        bn_batches=bn_batches if mode == "recompute" else 0,
        sparsity=float(masks.sparsity()) if masks is not None else 0.0,
        copies=[os.path.abspath(f) for f in folders],
        produced_by=shlex.join([os.path.basename(sys.executable), *sys.argv]),
    )
    write_json_atomic(os.path.join(output_dir, RESULT_NAME), result.to_dict())
    if plot:
        plot_path(result, os.path.join(output_dir, PLOT_NAME))
    return result


def plot_path(result: StabilityResult, path: str) -> None:
    """Error (%) and loss against alpha, with the endpoints' mean error that the instability is measured from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax_err.plot(result.alphas, [100 * e for e in result.error], marker="o", markersize=3)
    ax_err.axhline(50 * (result.error[0] + result.error[-1]), color="gray", linestyle="--", label="endpoints' mean")
    ax_err.set_xlabel("alpha (0 = copy 0, 1 = copy 1)")
    ax_err.set_ylabel(f"{result.eval_split or 'eval'} error (%)")
    ax_err.set_title(f"instability {100 * result.instability:.2f} points")
    ax_err.legend(loc="best", fontsize=8)
    ax_loss.plot(result.alphas, result.loss, marker="o", markersize=3, color="tab:orange")
    ax_loss.set_xlabel("alpha (0 = copy 0, 1 = copy 1)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"loss instability {result.loss_instability:.4f}")
    fig.suptitle(
        f"Linear interpolation of two copies trained from step {result.start_step} to {result.end_step} "
        f"({100 * (1 - result.sparsity):.1f}% of weights)",
        fontsize=10,
    )
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---- rewind points at other steps, and the sweep over k ---------------------------------------------------------


class _Capture(TrainerCallback):
    """Saves a Trainer checkpoint at each step in `steps`, copies it to `folders[step]` and stops after the last."""

    def __init__(self, folders: dict[int, str]) -> None:
        self.folders = folders

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.folders:
            control.should_save = True
        if state.global_step >= max(self.folders):
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.folders:
            source = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            copy_checkpoint(source, self.folders[step])
            shutil.rmtree(source)


def make_rewind_points(
    trainer: Trainer,
    steps: Sequence[int],
    folder: str,
    init_weights: Optional[str] = None,
    seed: Optional[int] = None,
    masks: Optional[MaskSet] = None,
) -> dict[int, str]:
    """Rewind points (Trainer checkpoints) at each of `steps`, from one training of the dense (or `masks`-masked)
    network from `init_weights` (default: the trainer's model as it is) with seed `seed` (default args.seed): what
    level 0 of an IMP run trained, replayed. Step 0 is theta_0 with a fresh optimizer. Returns {step: folder}."""
    steps = sorted(set(steps))
    schedule = schedule_length(trainer)
    bad = [k for k in steps if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < schedule]
    if not steps or bad:
        raise ValueError(f"rewind steps {bad or steps} must be ints in [0, {schedule}) (the schedule's steps).")
    model = _bare_copy(trainer.model)
    if init_weights is not None:
        load_weights_(model, load_saved_weights(init_weights, model))
    folders = {k: os.path.join(folder, f"step_{k:06d}") for k in steps}
    if 0 in folders:
        decay = set(trainer.get_decay_parameter_names(model))
        save_rewind_point(folders[0], model, {}, 0, trainer.args, decay, schedule)
    later = {k: f for k, f in folders.items() if k > 0}
    if later:
        work = os.path.join(folder, "train")
        args = _quiet_args(trainer, work, max_steps=schedule)
        side = _side_trainer(trainer, model, args, masks)
        side.add_callback(_Capture(later))
        set_seed(trainer.args.seed if seed is None else seed)  # as the lottery's level 0 (same data order)
        with run_console(side, folder):
            side.train_once(restore_masks=False)
        shutil.rmtree(work, ignore_errors=True)
    return folders


def instability_sweep(
    trainer: Trainer,
    run_dir: str,
    output_dir: str,
    steps: Optional[Sequence[int]] = None,
    level: Optional[int] = None,
    replicate: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """The instability of an IMP run's subnetwork rewound to each step k in `steps` (Frankle et al. 2020, Fig. 5):
    a thin loop over `instability` with the masks of trunk level `level` (default: the last finished one).

    The run's own rewind point serves its k; other steps are made by replaying level 0 from the run's theta_0
    (`make_rewind_points`, seed args.seed + replicate as the runner uses). `trainer` is built from the run's recipe.
    `kwargs` go to `instability` (data_seeds, points, max_steps, eval_split, batchnorm, ...). Writes
    `stability_sweep.json` (and a plot) in `output_dir`, each k's analysis in `k_<k>/`.
    """
    roots = replicate_roots(run_dir)
    if not 0 <= replicate < len(roots):
        raise ValueError(f"replicate={replicate} is not in {run_dir!r}, which holds {len(roots)} replicate(s).")
    root = roots[replicate]
    levels = finished_levels(root)
    if not levels:
        raise ValueError(f"{run_dir!r} is not an IMP run folder (no finished level_NN/ in {root!r}).")
    level = max(levels) if level is None else level
    if level not in levels:
        raise ValueError(f"level {level} is not a finished level of {root!r}: finished ones are {levels}.")
    masks = MaskSet.load(level_dir(root, level))
    own_point = rewind_point_dir(root)
    own_k = rewind_point_step(own_point) if os.path.isdir(own_point) else None
    if steps is None:
        if own_k is None:
            raise ValueError(f"{root!r} has no rewind point (it rewinds to init): pass the steps k to measure.")
        steps = [own_k]
    steps = sorted(set(steps))
    points = {own_k: own_point} if own_k in steps else {}
    others = [k for k in steps if k not in points]
    if others:
        level0 = MaskSet.load(level_dir(root, 0)) if 0 in levels else None
        points.update(
            make_rewind_points(
                trainer,
                others,
                os.path.join(output_dir, "rewind_points"),
                init_weights=init_weights_path(root),
                seed=trainer.args.seed + replicate,
                masks=level0,
            )
        )
    rows = []
    for k in steps:
        result = instability(trainer, points[k], os.path.join(output_dir, f"k_{k:06d}"), masks=masks, **kwargs)
        rows.append(
            {
                "k": k,
                "instability": result.instability,
                "loss_instability": result.loss_instability,
                "endpoint_errors": [result.error[0], result.error[-1]],
                "max_error": max(result.error),
                "folder": os.path.abspath(os.path.join(output_dir, f"k_{k:06d}")),
            }
        )
    sweep = {
        "run": os.path.abspath(root),
        "level": level,
        "remaining_weights_pct": 100.0 * (1.0 - masks.sparsity()),
        "run_rewind_step": own_k,
        "steps": rows,
    }
    write_json_atomic(os.path.join(output_dir, SWEEP_NAME), sweep)
    if kwargs.get("plot", True) and len(rows) > 1:
        plot_sweep(sweep, os.path.join(output_dir, SWEEP_PLOT_NAME))
    return sweep


def plot_sweep(sweep: dict, path: str) -> None:
    """Instability (error rise, percentage points) against the rewind step k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [row["k"] for row in sweep["steps"]]
    ax.plot(ks, [100 * row["instability"] for row in sweep["steps"]], marker="o")
    ax.set_xlabel("rewind step k")
    ax.set_ylabel("instability (error rise, percentage points)")
    ax.set_title(f"Level {sweep['level']} subnetwork ({sweep['remaining_weights_pct']:.1f}% of weights)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def recipe_from_run(path: str) -> tuple[str, list[str]]:
    """(recipe, overrides) of the `hf-tickets run` command that made the run holding `path` (a run folder or its
    rewind point), read from level 0's metrics.json `produced_by`; a ValueError when it was made another way."""
    from .files import METRICS_NAME, read_json

    folder = os.path.abspath(path)
    candidates = [folder, os.path.dirname(folder)]
    for root in candidates:
        for replicate in replicate_roots(root):
            metrics = os.path.join(level_dir(replicate, 0), METRICS_NAME)
            if os.path.isfile(metrics):
                tokens = shlex.split(str(read_json(metrics).get("produced_by", "")))
                if "run" in tokens and tokens.index("run") + 1 < len(tokens):
                    rest = tokens[tokens.index("run") + 1 :]
                    return rest[0], [t for t in rest[1:] if not t.startswith("--")]
                raise ValueError(
                    f"{metrics} says the run was made by {' '.join(tokens)!r}, not `hf-tickets run RECIPE`: pass "
                    "--recipe (and the overrides it was run with)."
                )
    raise ValueError(f"no IMP run found at or above {path!r} to read its recipe from: pass --recipe.")
