"""`TicketTrainer`: a drop-in `transformers.Trainer` that keeps masked weights at exactly zero.

Enforcement is one callback (`SparsityCallback`): gradients of pruned weights are zeroed before the optimizer step
and pruned weights are re-zeroed after it, both with one foreach call over all masked tensors. It acts once per
optimizer step (never per micro-step), so gradient accumulation, clipping, AMP and GradScaler-skipped steps all
see the same rule.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .cards import write_model_card
from .config import ITERATIVE_METHODS, SparsityConfig
from .enforce import MaskEnforcer
from .masks import MASKS_NAME, MaskSet
from .sparsify import MASKS_ATTR, apply_sparsity

logger = logging.getLogger(__name__)

ENGINES = ("trainer", "batched")


class SparsityCallback(TrainerCallback):
    """Mask gradients before each optimizer step and weights after it.

    Also usable with a plain `Trainer`: `Trainer(..., callbacks=[SparsityCallback(masks, model)])`. With
    `TicketTrainer`, gradients are masked even earlier, before gradient clipping, so that the clipping norm is the
    norm of the sparse network's gradient.
    """

    def __init__(self, masks: MaskSet, model: Optional[nn.Module] = None) -> None:
        self.masks = masks
        self.model = model
        self._grads_masked = False
        self._enforcer: Optional[MaskEnforcer] = None

    def enforcer(self, model: nn.Module) -> MaskEnforcer:
        if self._enforcer is None or self._enforcer.masks is not self.masks or self._enforcer.model is not model:
            self._enforcer = MaskEnforcer(self.masks, model)
        return self._enforcer

    def _model(self, kwargs: dict) -> nn.Module:
        model = self.model if self.model is not None else kwargs.get("model")
        if model is None:
            raise ValueError("SparsityCallback needs the model: pass SparsityCallback(masks, model).")
        return model

    def mask_grads(self, model: Optional[nn.Module] = None) -> None:
        """Zero pruned gradients once for the current optimizer step."""
        if not self._grads_masked:
            self.enforcer(model if model is not None else self._model({})).mask_grads_()
            self._grads_masked = True

    def on_train_begin(self, args, state, control, **kwargs):
        # Weights loaded from a checkpoint or changed by the user since the masks were made are zeroed again.
        self.enforcer(self._model(kwargs)).mask_weights_()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mask_grads(self._model(kwargs))

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Momentum and weight decay would move pruned weights off zero; a skipped (inf) fp16 step changes nothing.
        self.enforcer(self._model(kwargs)).mask_weights_()
        self._grads_masked = False


class TicketTrainer(Trainer):
    """`transformers.Trainer` that trains a sparse model and saves its masks.

    Args:
        sparsity_config: how to prune. Masks are computed when the trainer is built (one-shot methods) and the
            pruned weights are zeroed in place.
        masks: an existing `MaskSet` (e.g. from `load_masks`) to enforce instead of computing new masks.
        engine: how `method="imp"` runs. `"trainer"` (default): every level is a `Trainer.train` call, with all of
            Trainer's features. `"batched"`: levels train in lockstep passes of `BatchedMaskedTraining`, on CUDA
            replayed from a CUDA graph, for small image networks held as tensors (see
            `hf_tickets.lottery.experiment`); `train_experiment` then trains trunk, controls and replicates of a
            level together. It runs no Trainer callbacks, so it refuses user callbacks and custom metrics.
        *args, **kwargs: every `transformers.Trainer` argument.

    A model already passed through `apply_sparsity` keeps its masks when neither argument is given.
    """

    def __init__(
        self,
        *args: Any,
        sparsity_config: Optional[SparsityConfig] = None,
        masks: Optional[MaskSet] = None,
        engine: str = "trainer",
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is unknown: use one of {list(ENGINES)}.")
        if model is None:
            raise ValueError("TicketTrainer needs `model` (model_init is not supported): pass the model to sparsify.")
        if sparsity_config is not None and not isinstance(sparsity_config, SparsityConfig):
            raise ValueError(f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}.")
        if masks is None and sparsity_config is None and getattr(model, MASKS_ATTR, None) is None:
            raise ValueError(
                "TicketTrainer needs sparsity_config=SparsityConfig(...) or masks=load_masks(...) (or a model "
                "passed through apply_sparsity); without them use transformers.Trainer."
            )
        if masks is None and sparsity_config is None:
            masks = getattr(model, MASKS_ATTR)
        if sparsity_config is None:
            sparsity_config = _config_from_masks(masks)
        if engine == "batched" and sparsity_config.method not in ITERATIVE_METHODS:
            raise ValueError(
                f"engine='batched' runs IMP experiments (method='imp'), got method={sparsity_config.method!r}: use "
                "engine='trainer'."
            )
        self.sparsity_config = sparsity_config
        self.engine = engine
        self._user_optimizer = (kwargs.get("optimizers") or (None, None))[0] is not None
        self.masks = apply_sparsity(model, sparsity_config, masks=masks)
        self.sparsity_callback = SparsityCallback(self.masks, model)
        super().__init__(*args, **kwargs)
        self.add_callback(self.sparsity_callback)

    def set_masks(self, masks: MaskSet) -> None:
        """Enforce `masks` from now on (zeroes the newly pruned weights at once)."""
        self._masks_logged = None  # the next log line carries the per-layer sparsity again
        self.masks = apply_sparsity(self.model, self.sparsity_config, masks=masks)
        self.sparsity_callback.masks = self.masks

    # ---- training loop hooks ----------------------------------------------------------------------------------

    def _clip_grad_norm(self, model):
        # Mask first, so clipping scales by the norm of the gradient the sparse network actually uses.
        self.sparsity_callback.mask_grads(self.model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # Without clipping, Trainer still measures the norm: make it the sparse network's too.
        if grad_norm is None:
            self.sparsity_callback.mask_grads(self.model)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """Train; with method="imp", run every IMP level (see `hf_tickets.lottery`).

        For IMP, `resume_from_checkpoint` is implied: finished levels in `output_dir` are skipped and an
        interrupted level resumes from its last checkpoint (with engine="batched": is trained again). IMP returns
        the metrics of the last level it trained.
        """
        if self.engine == "batched":  # like IMPRunner: the last trained trunk level's metrics (None if all were done)
            metrics = self.train_experiment()
            return metrics[0] if metrics else None
        if self.sparsity_config.method in ITERATIVE_METHODS:
            from .lottery import IMPRunner

            return IMPRunner(self).run()
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and os.path.isfile(os.path.join(checkpoint, MASKS_NAME)):
            logger.info("Restoring masks from %s", checkpoint)
            self.set_masks(MaskSet.load(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def train_control(self, kind: str, trunk_dir: Optional[str] = None, levels: Optional[list[int]] = None) -> str:
        """Run an LTH control next to a finished IMP trunk; returns the control's folder.

        Args:
            kind: `"reinit"` (the trunk's masks on a fresh random initialisation from another seed) or
                `"random_prune"` (random masks with the trunk's per-layer counts, rewound like the trunk).
            trunk_dir: the trunk's output_dir (default: this trainer's `args.output_dir`).
            levels: trunk levels to run (default: every finished pruned level); each is skipped if already done.
        """
        if self.engine == "batched":
            if trunk_dir not in (None, self.args.output_dir):
                raise ValueError("engine='batched' runs controls of its own output_dir: leave trunk_dir unset.")
            return self._experiment().run_controls(kind, levels)
        from .lottery import run_control

        return run_control(self, kind, trunk_dir or self.args.output_dir, levels)

    def train_experiment(
        self, controls: tuple = (), control_levels: Optional[list[int]] = None, replicates: int = 1
    ) -> list[dict]:
        """engine="batched": every IMP level of the trunk, `controls` and `replicates` in one lockstep pass per level.

        Args:
            controls: control kinds trained beside the trunk: `"reinit"`, `"random_prune"`.
            control_levels: trunk levels the controls run at (default: every pruned level).
            replicates: independent repetitions (own theta_0 and data order); with more than one, replicate r
                writes to `<output_dir>/replicate_r`.

        Returns the metrics of the networks of the last level trained. The layout on disk is the `"trainer"`
        engine's (level folders, controls next to the trunk, imp_report.json and plots per replicate).
        """
        if self.engine != "batched":
            raise ValueError(
                "train_experiment needs TicketTrainer(..., engine='batched'); use train() and "
                "train_control() with engine='trainer'."
            )
        experiment = self._experiment(replicates)
        metrics = experiment.run(tuple(controls), control_levels)
        self.last_experiment = experiment
        self._load_last_trunk_level(experiment.replicate_root(0))
        return metrics

    def _experiment(self, replicates: int = 1):
        from .lottery.experiment import LockstepExperiment

        return LockstepExperiment.from_trainer(self, replicates=replicates)

    def _load_last_trunk_level(self, root: str) -> None:
        """After a batched run the trainer holds the last trunk level's weights and masks, as after `train()`."""
        from .lottery.controls import trunk_levels
        from .lottery.levels import level_dir
        from .lottery.lockstep import load_weights_

        levels = trunk_levels(root) or [0]
        folder = level_dir(root, max(levels))
        if os.path.isfile(os.path.join(folder, "model.safetensors")):
            from safetensors.torch import load_file

            device = next(self.model.parameters()).device
            load_weights_(
                self.model, {k: v.to(device) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
            )
            self.set_masks(MaskSet.load(folder))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add overall sparsity to every log, and per-layer sparsity to the first log after the masks change.

        Per-layer values only change with the masks, so repeating ~one key per layer on every line would only
        bury the loss in the console and in `report_to` backends.
        """
        logs = dict(logs)
        logs["sparsity"] = round(self.masks.sparsity(), 6)
        if getattr(self, "_masks_logged", None) is not self.masks:
            for name, value in self.masks.layer_sparsity().items():
                logs[f"sparsity/{name}"] = round(value, 6)
            self._masks_logged = self.masks
        super().log(logs, *args, **kwargs)

    # ---- saving -----------------------------------------------------------------------------------------------

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.masks.save(output_dir)
        self.sparsity_config.save_pretrained(output_dir)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            write_model_card(
                output_dir if output_dir is not None else self.args.output_dir,
                masks=self.masks,
                config=self.sparsity_config,
                model=self.model,
                metrics=_last_eval_metrics(self.state.log_history),
            )

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # Trainer rewrites README.md before push_to_hub; put the sparsity section back into its card.
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            write_model_card(
                self.args.output_dir,
                masks=self.masks,
                config=self.sparsity_config,
                model=self.model,
                metrics=_last_eval_metrics(self.state.log_history),
            )


def _config_from_masks(masks: MaskSet) -> SparsityConfig:
    """A config describing masks that came without one (loaded from a file)."""
    from .methods import available_methods

    meta = masks.metadata
    method = str(meta.get("method", "magnitude"))
    # Loaded masks are enforced as they are: describe them as one-shot, never restart an iterative run.
    if method not in available_methods() or method in ITERATIVE_METHODS:
        method = "magnitude"
    try:
        return SparsityConfig(
            method=method,
            sparsity=min(masks.sparsity(), 0.999999),
            pattern=str(meta.get("pattern", "unstructured")),
            scope=str(meta.get("scope", "global")),
            seed=int(meta.get("seed", 0)),
        )
    except ValueError:
        return SparsityConfig(sparsity=min(masks.sparsity(), 0.999999))


def _last_eval_metrics(log_history: list[dict]) -> dict[str, float]:
    """The metrics of the most recent evaluation step (every eval set of it), without timing entries."""
    timing = ("runtime", "per_second")

    def evals(entry: dict) -> dict:
        return {
            k: v
            for k, v in entry.items()
            if k.startswith("eval_") and isinstance(v, (int, float)) and not any(t in k for t in timing)
        }

    steps = [e.get("step") for e in log_history if evals(e)]
    if not steps:
        return {}
    merged: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") == steps[-1]:
            merged.update(evals(entry))
    return merged
