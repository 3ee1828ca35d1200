"""A whole lottery-ticket experiment in one pass per level: IMP trunks, both controls and replicates together.

At level L every network of the experiment has what it needs before the level starts: the trunk's masks come
from level L-1, the reinit control uses the same masks on a fresh initialisation, the random-pruning control
random masks with the same per-layer counts, and each replicate repeats all of it from its own theta_0 and data
order. So the level's networks train together, in lockstep (`train_lockstep`, `BatchedMaskedTraining`), instead
of one `Trainer.train` after another.

The result on disk is the sequential engine's (`IMPRunner`, `run_control`) layout, so reports, plots, tickets
and `from_pretrained` work unchanged:

    <root>/init_weights.safetensors, rewind_point.safetensors (step k: weights + optimizer buffers)
    <root>/level_NN/                      trunk: model.safetensors, masks.safetensors, metrics.json, README.md
    <root>.reinit/level_NN/, <root>.random_prune/level_NN/       the controls
    <root>/imp_report.json, imp_accuracy.png, imp_early_stop.png

with `<root>` = `output_dir` for one replicate and `output_dir/replicate_R` for several. Levels are written
atomically and finished ones skipped on a restart (an interrupted level is trained again from its start).

What it supports: `method="imp"` with `rewind="init"` or `"step"`; models without BatchNorm running statistics;
`TensorImageDataset` data; AdamW/Adam or SGD (momentum, Nesterov) as `TrainingArguments.optim`; every
transformers LR schedule; gradient clipping; weight decay with the Trainer's exemptions. Batches are always full
(a batch may straddle two epochs) and their order comes from `seed` + replicate, so a level's numbers are those of
the same experiment under `Trainer`, not the same bits. It runs no Trainer callbacks and computes loss and
accuracy itself: `TicketTrainer(engine="batched")` refuses user callbacks and other `compute_metrics`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..allocation import random_masks_like
from ..cards import write_model_card
from ..config import SparsityConfig
from ..masks import MaskSet
from ..methods import build_method
from .controls import REINIT_SEED_OFFSET, fresh_init_weights
from .identity import check_identity, run_identity
from .layout import CONTROL_KINDS, control_dir
from .levels import INIT_WEIGHTS_NAME, _finish_level, is_complete, level_dir, save_init_weights
from .lockstep import (
    ArmStart,
    SplitTensors,
    TrainPlan,
    batch_tables,
    load_weights_,
    plan_from_training_args,
    train_lockstep,
)

logger = logging.getLogger(__name__)

REWIND_POINT_NAME = "rewind_point.safetensors"
REPLICATE_SEED_OFFSET = 7919  # replicate r > 0 draws theta_0 from the trunk seed plus r times this


class LockstepExperiment:
    """IMP trunk(s), controls and replicates of one experiment, trained one lockstep pass per level.

    Args:
        model: the network; its current weights are theta_0 of replicate 0 (copied, never changed).
        config: a `SparsityConfig` with `method="imp"` and `rewind="init"` or `"step"`.
        args: `TrainingArguments`: output_dir, steps/epochs, batch size, optim, LR schedule, eval_steps, seed.
        train_dataset: a `TensorImageDataset`.
        eval_dataset: a `TensorImageDataset` (validation) or a dict with `"validation"` and optionally `"test"`.
        replicates: independent repetitions (own theta_0 and data order), trained in the same passes.
        decay_names: parameters weight decay applies to (default: the Trainer's choice, biases and norms exempt).
        device: where to train (default: `args.device`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        args,
        train_dataset,
        eval_dataset,
        replicates: int = 1,
        decay_names: Optional[set] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        self.method = build_method(config)
        if not self.method.iterative:
            raise ValueError(f"the batched engine runs iterative (IMP) experiments, got method={config.method!r}.")
        if config.rewind not in ("init", "step"):
            raise ValueError(
                f"SparsityConfig.rewind={config.rewind!r} is not supported by the batched engine: use 'init' or "
                "'step' (late rewinding), or engine='trainer'."
            )
        if not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates must be an int >= 1, got {replicates!r}.")
        self.model, self.config, self.args = model, config, args
        self.replicates = replicates
        self.device = torch.device(device) if device is not None else args.device
        self._train_dataset = train_dataset  # as given, for the run identity (the same as the trainer engine's)
        self.train = _tensors(train_dataset, "train_dataset", self.device)
        self.eval_splits = _eval_splits(eval_dataset, self.device)
        if decay_names is None:
            decay_names = _trainer_decay_names(model)
        self.plan: TrainPlan = plan_from_training_args(args, model, len(self.train.y), decay_names)
        self.k = config.rewind_step_for(self.plan.total_steps) if config.rewind == "step" else 0
        if config.rewind == "step" and self.k >= self.plan.total_steps:
            raise ValueError(
                f"SparsityConfig.rewind_step={config.rewind_step} is step {self.k}, at or past the end of training "
                f"({self.plan.total_steps} steps per level): choose a step below it or a fraction such as 0.05."
            )
        from ..targets import resolve_targets

        self.level0_masks = self.method.initial_masks(model, resolve_targets(model, config), None)
        self.template = _cpu_copy(model)
        self.root = args.output_dir
        self.last_pass: dict[str, Any] = {}
        self._trunk_final: dict[tuple[int, int], dict] = {}
        self._tables: Optional[torch.Tensor] = None

    @classmethod
    def from_trainer(cls, trainer, replicates: int = 1) -> "LockstepExperiment":
        """The experiment a `TicketTrainer` describes (model, config, args, datasets)."""
        _check_trainer(trainer)
        return cls(
            trainer.model,
            trainer.sparsity_config,
            trainer.args,
            trainer.train_dataset,
            trainer.eval_dataset,
            replicates=replicates,
            decay_names=set(trainer.get_decay_parameter_names(trainer.model)),
        )

    # ---- layout ------------------------------------------------------------------------------------------------

    def replicate_root(self, r: int) -> str:
        return self.root if self.replicates == 1 else os.path.join(self.root, f"replicate_{r}")

    def _init_file(self, r: int) -> str:
        root = self.replicate_root(r)
        if r == 0:
            return save_init_weights(self.template, root)
        return fresh_init_weights(self.template, self.config.seed + REPLICATE_SEED_OFFSET * r, _init_path(root))

    def _reinit_file(self, r: int) -> str:
        path = os.path.join(control_dir(self.replicate_root(r), "reinit"), "reinit_weights.safetensors")
        return fresh_init_weights(self.template, self.config.seed + REINIT_SEED_OFFSET + r, path)

    # ---- the experiment ----------------------------------------------------------------------------------------

    def run(self, controls: tuple = (), control_levels: Optional[list[int]] = None) -> list[dict]:
        """Train every level of every replicate, with `controls` at `control_levels` (default: every pruned level)
        in the same passes; write the report of each replicate. Returns the metrics of the last level's arms."""
        controls = _check_controls(controls)
        self._check_identity(write=True)
        levels = self.config.num_levels()
        wanted_controls = set(range(1, levels + 1)) if control_levels is None else set(control_levels)
        bad = sorted(level for level in wanted_controls if not 1 <= level <= levels)
        if bad:
            raise ValueError(f"control_levels {bad} are not pruned levels of this run (1..{levels}).")
        for r in range(self.replicates):
            self._init_file(r)
        masks = [self.level0_masks] * self.replicates
        out: list[dict] = []
        for level in range(levels + 1):
            if level > 0:
                masks = [self._prune(r, level, masks[r]) for r in range(self.replicates)]
            jobs = []
            for r in range(self.replicates):
                root = self.replicate_root(r)
                jobs.append(("trunk", r, level_dir(root, level)))
                if level in wanted_controls:
                    jobs += [(kind, r, level_dir(control_dir(root, kind), level)) for kind in controls]
            jobs = [job for job in jobs if not is_complete(job[2])]
            if jobs:
                out = self._train_jobs(jobs, lambda job, masks=masks: masks[job[1]])
        self._write_reports()
        return out

    def run_controls(self, kind: str, levels: Optional[list[int]] = None) -> str:
        """Control `kind` for finished trunk levels, all levels in one pass; returns the control folder (of
        replicate 0)."""
        _check_controls((kind,))
        self._check_identity(write=False)
        from .layout import trunk_levels

        for r in range(self.replicates):
            root = self.replicate_root(r)
            available = trunk_levels(root) if os.path.isdir(root) else []
            wanted = available if levels is None else list(levels)
            missing = [level for level in wanted if level not in available]
            if missing:
                raise ValueError(
                    f"trunk {root!r} has no finished pruned level {missing}: finished ones are {available}."
                )
            jobs = [(kind, r, level_dir(control_dir(root, kind), lv)) for lv in wanted]
            jobs = [job for job in jobs if not is_complete(job[2])]
            if jobs:
                trunk_masks = {lv: MaskSet.load(level_dir(root, lv)) for lv in wanted}
                self._train_jobs(jobs, lambda job, masks=trunk_masks: masks[_level_of(job)])
        self._write_reports()
        return control_dir(self.replicate_root(0), kind)

    def _check_identity(self, write: bool) -> None:
        """The run folder's identity: the trainer engine computes the same one, so either engine may continue it."""
        identity = run_identity(self.config, self.args, self.model, self._train_dataset)
        check_identity(self.args.output_dir, identity, write=write)

    # ---- one level ---------------------------------------------------------------------------------------------

    def _prune(self, r: int, level: int, current: MaskSet) -> MaskSet:
        """Masks of `level` for replicate r: from its folder if finished, else prune level-1's final weights."""
        done = level_dir(self.replicate_root(r), level)
        if is_complete(done):
            return MaskSet.load(done)
        weights = self._trunk_final.get((r, level - 1))
        if weights is None:  # restarted run: the previous level's weights from its folder
            weights = load_file(os.path.join(level_dir(self.replicate_root(r), level - 1), "model.safetensors"))
        model = _cpu_copy(self.template)
        load_weights_(model, weights)
        return self.method.next_level_masks(model, current, level)

    def _train_jobs(self, jobs: list, masks_of) -> list[dict]:
        """Build the arms of `jobs` ((kind, replicate, folder)), train them in one pass, write their folders."""
        arms, arm_masks = [], []
        for job in jobs:
            kind, r, _ = job
            lv = _level_of(job)
            trunk_masks = masks_of(job)
            if kind == "trunk":
                arm_mask = MaskSet(dict(trunk_masks), dict(trunk_masks.metadata))
            elif kind == "reinit":
                arm_mask = MaskSet({n: m.clone() for n, m in trunk_masks.items()}, dict(trunk_masks.metadata))
            else:
                arm_mask = MaskSet(random_masks_like(trunk_masks, self.config.seed + lv), dict(trunk_masks.metadata))
            arm_mask.metadata["level"] = lv
            if kind != "trunk":
                arm_mask.metadata["control"] = kind
            arm_masks.append(arm_mask)
            arms.append(self._arm_start(kind, r, lv, arm_mask))
        makes_rewind_point = self.k > 0 and any(job[0] == "trunk" and _level_of(job) == 0 for job in jobs)
        if self._tables is None:  # every level replays the same data orders: draw them once
            self._tables = batch_tables(self.plan, len(self.train.y), self.replicates, self.device)
        tables = self._tables
        started = time.perf_counter()
        results = train_lockstep(
            self.template,
            arms,
            self.plan,
            self.train,
            self.eval_splits,
            tables,
            snapshot_step=self.k if makes_rewind_point else None,
        )
        seconds = time.perf_counter() - started
        steps = sum(self.plan.total_steps - arm.start_step for arm in arms)
        self.last_pass = {"networks": len(arms), "network_steps": steps, "seconds": seconds}
        best = [r.history[-1].get("validation", {}).get("accuracy") if r.history else None for r in results]
        logger.info(
            "level %s: %d networks, %d network-steps in %.1f s (%.0f/s); final validation accuracy %s",
            ", ".join(str(lv) for lv in sorted({_level_of(job) for job in jobs})),
            len(arms),
            steps,
            seconds,
            steps / max(seconds, 1e-9),
            ", ".join(f"{job[0]}[{job[1]}] {acc:.4f}" for job, acc in zip(jobs, best) if acc is not None),
        )
        out = []
        for job, arm_mask, result in zip(jobs, arm_masks, results):
            kind, r, folder = job
            if kind == "trunk":
                if result.snapshot is not None:  # written before level_00 is published: a finished level 0 has it
                    self._save_rewind_point(r, result.snapshot)
                self._trunk_final[(r, _level_of(job))] = result.weights
            metrics = self._metrics(job, arm_mask, result)
            self._write(folder, arm_mask, result.weights, metrics)
            out.append(metrics)
        return out

    def _arm_start(self, kind: str, r: int, level: int, masks: MaskSet) -> ArmStart:
        theta0 = load_file(self._init_file(r))
        if kind == "reinit":
            return ArmStart(load_file(self._reinit_file(r)), dict(masks), 0, None, r)
        if level == 0 or self.k == 0:
            return ArmStart(theta0, dict(masks), 0, None, r)
        point = load_file(self._rewind_point_path(r))
        weights = dict(theta0)
        state = {}
        for key, value in point.items():
            kind_of, _, name = key.partition("/")
            if kind_of == "weights":
                weights[name] = value
            else:
                state[key] = value
        return ArmStart(weights, dict(masks), self.k, state, r)

    def _rewind_point_path(self, r: int) -> str:
        path = os.path.join(self.replicate_root(r), REWIND_POINT_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} is missing: level 0 of this run must be trained (again) to make the rewind point."
            )
        return path

    def _save_rewind_point(self, r: int, snapshot: dict) -> None:
        path = os.path.join(self.replicate_root(r), REWIND_POINT_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in snapshot.items()}, path + ".tmp", {"step": str(self.k)})
        os.replace(path + ".tmp", path)

    def _metrics(self, job, masks: MaskSet, result) -> dict:
        kind, r, _ = job
        level = int(masks.metadata.get("level", 0))
        report = masks.report()
        metrics: dict[str, Any] = {
            "level": level,
            "sparsity": report["sparsity"],
            "remaining_weights_pct": 100.0 * report["kept"] / max(report["numel"], 1),
            "kept": report["kept"],
            "numel": report["numel"],
            "train_loss": result.train_loss,
            "steps": self.plan.total_steps,
            "engine": "batched",
            "replicate": r,
            "rewind": self.config.rewind,
            "rewind_step_k": self.k,
            "config_hash": self.config.hashname(),
            "last_learning_rate": self.plan.lrs[-1],
        }
        history = result.history
        if history and "validation" in history[-1]:
            best = min(history, key=lambda row: row["validation"]["loss"])
            metrics["final_eval"] = dict(history[-1]["validation"])
            metrics["best_eval"] = dict(best["validation"])
            metrics["early_stop_step"] = best["step"]
            if "test" in best:
                metrics["test_at_early_stop"] = dict(best["test"])
                metrics["final_test"] = dict(history[-1]["test"])
        if kind != "trunk":
            trunk_level = level_dir(self.replicate_root(r), level)
            metrics.update(
                control=kind,
                trunk_dir=os.path.abspath(self.replicate_root(r)),
                trunk_level=level,
                trunk_masks=os.path.join(os.path.abspath(trunk_level), "masks.safetensors"),
                trunk_config_hash=self.config.hashname(),
            )
        return metrics

    def _write(self, folder: str, masks: MaskSet, weights: dict, metrics: dict) -> None:
        partial = folder + ".partial"
        os.makedirs(partial, exist_ok=True)
        model = _cpu_copy(self.template)
        load_weights_(model, weights)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(partial)
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(partial, "model.safetensors"))
        masks.save(partial)
        self.config.save_pretrained(partial)
        evals = {f"eval_validation_{k}": v for k, v in (metrics.get("final_eval") or {}).items()}
        write_model_card(partial, masks=masks, config=self.config, model=model, metrics=evals)
        _finish_level(partial, folder, metrics)

    def _write_reports(self) -> None:
        from .report import write_report

        for r in range(self.replicates):
            if os.path.isdir(self.replicate_root(r)):
                write_report(self.replicate_root(r))


# ---- helpers ----------------------------------------------------------------------------------------------------


def _level_of(job) -> int:
    return int(os.path.basename(job[2])[len("level_") :])


def _init_path(root: str) -> str:
    return os.path.join(root, INIT_WEIGHTS_NAME)


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).cpu()
    for attr in ("hf_tickets_masks",):
        if attr in clone.__dict__:
            del clone.__dict__[attr]
    return clone


def _check_controls(controls) -> tuple:
    controls = tuple(controls or ())
    unknown = [kind for kind in controls if kind not in CONTROL_KINDS]
    if unknown:
        raise ValueError(f"control kinds {unknown} are unknown: choose from {list(CONTROL_KINDS)}.")
    return controls


def _tensors(dataset, what: str, device) -> SplitTensors:
    pixels, labels = getattr(dataset, "pixel_values", None), getattr(dataset, "labels", None)
    if not isinstance(pixels, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"the batched engine needs {what} as a hf_tickets.data.TensorImageDataset (image tensors), got "
            f"{type(dataset).__name__}: use engine='trainer' for other data."
        )
    return SplitTensors(pixels.to(device), labels.to(device))


def _eval_splits(eval_dataset, device) -> dict[str, SplitTensors]:
    if eval_dataset is None:
        raise ValueError("the batched engine needs eval_dataset (a validation split) to find the early-stop step.")
    if not isinstance(eval_dataset, dict):
        return {"validation": _tensors(eval_dataset, "eval_dataset", device)}
    if "validation" not in eval_dataset:
        raise ValueError(f"eval_dataset needs a 'validation' entry (and optionally 'test'), got {list(eval_dataset)}.")
    return {
        name: _tensors(ds, f"eval_dataset[{name!r}]", device)
        for name, ds in eval_dataset.items()
        if name in ("validation", "test")
    }


def _trainer_decay_names(model: nn.Module) -> set:
    from transformers.trainer_pt_utils import get_parameter_names

    norms = [nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm]
    names = get_parameter_names(model, norms)
    return {n for n in names if "bias" not in n}


def _check_trainer(trainer) -> None:
    """Refuse what the batched engine would silently drop: user callbacks and other metrics."""
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    from ..callbacks import SparsityCallback
    from .metrics import accuracy

    builtin = (DefaultFlowCallback, PrinterCallback, ProgressCallback, SparsityCallback)
    extra = [type(cb).__name__ for cb in trainer.callback_handler.callbacks if not isinstance(cb, builtin)]
    if extra:
        raise ValueError(
            f"engine='batched' does not run Trainer callbacks, but the trainer has {extra} (report_to integrations "
            "count too: set report_to=[]): remove them or use engine='trainer'."
        )
    if trainer.compute_metrics not in (None, accuracy):
        raise ValueError(
            "engine='batched' computes loss and accuracy itself and cannot call a custom compute_metrics: pass "
            "compute_metrics=None (or hf_tickets.lottery.metrics.accuracy) or use engine='trainer'."
        )
    if getattr(trainer, "_user_optimizer", False):
        raise ValueError(
            "engine='batched' builds its own optimizer from TrainingArguments.optim: pass no optimizers=."
        )
