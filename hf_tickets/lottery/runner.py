"""The lottery runner: the one IMP level loop, for the trunk, its controls and replicates, on either backend.

Per level it plans every arm (the trunk of each replicate; the `reinit` and `random_prune` controls at the levels
asked for), skips arms whose level folder is finished, and hands the rest to a backend: `"trainer"` trains them
one at a time through the `TicketTrainer` (every Trainer feature), `"lockstep"` trains them together in one pass
(small image networks; see `lockstep_backend.py`). Both read and write the same files (`layout.py`, `rewind.py`),
so a run may mix them: a trunk trained by one and controls by the other.

Before anything is trained or reused, the run's identity is checked (`identity.py`): a restart with other settings
stops with the fields that differ. Each level's metrics.json records what determines it (the run identity, the
masks and start weights it used, the backend), the data set it trained on (`"data"`: name, source, split sizes) and
the command that produced it.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from safetensors.torch import save_model

from ..allocation import random_masks_like
from ..checkpoints import load_saved_weights
from ..datasets_source import data_line
from ..distributed import model_is_sharded
from ..enforce import apply_masks_
from ..files import MASKS_NAME, WEIGHTS_NAME
from ..masks import MaskSet
from ..peft_interop import is_peft_model
from ..run_log import run_bar, run_console
from .arms import Arm, load_into_, masked_copy_digest
from .identity import check_identity, run_identity, tensors_digest
from .layout import (
    CONTROL_KINDS,
    PARTIAL_SUFFIX,
    arm_root,
    finish_publish,
    init_weights_path,
    is_complete,
    level_dir,
    read_metrics,
    reinit_weights_path,
    replicate_root,
    rewind_point_dir,
)
from .metrics import data_record
from .start_weights import fresh_init_weights, replicate_init_weights

if TYPE_CHECKING:
    from .trainer_protocol import LotteryTrainer

logger = logging.getLogger(__name__)

BACKENDS = ("trainer", "lockstep")
REINIT_SEED_OFFSET = 1_000_003  # the reinit control's seed is the trunk's seed plus this: "another seed"
REPLICATE_SEED_OFFSET = 7919  # replicate r > 0 draws theta_0 from the trunk seed plus r times this


@dataclass
class RunSummary:
    """What one call of the runner did: arms trained and reused (names like `trunk[0] level 3`), last metrics."""

    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    last_trunk_metrics: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


class LotteryRunner:
    """Runs the levels of an IMP experiment described by a `TicketTrainer` (model, `SparsityConfig`, arguments, data).

    Args:
        trainer: a `TicketTrainer` with an iterative method (`method="imp"`); its model's weights are theta_0.
        backend: `"trainer"` or `"lockstep"`.
        replicates: independent repetitions (own theta_0 and data order; a pretrained model keeps its checkpoint's
            weights and draws only its new head, see `start_weights.py`); with more than one, replicate r writes
            to `<output_dir>/replicate_r` and the run's report gives each level's mean and spread.
        command: the command line recorded as "produced by" in the levels it trains (default: this process's).
    """

    def __init__(
        self, trainer: "LotteryTrainer", backend: str = "trainer", replicates: int = 1, command: Optional[str] = None
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown: use one of {list(BACKENDS)}.")
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates must be an int >= 1, got {replicates!r}.")
        method = getattr(trainer, "sparsity_method", None)
        if method is None or not method.iterative:
            name = getattr(getattr(trainer, "sparsity_config", None), "method", None)
            raise ValueError(
                f"a lottery run needs an iterative method (SparsityConfig(method='imp', ...)), got method={name!r}."
            )
        self.trainer = trainer
        self.config = trainer.sparsity_config
        self.method = method
        self.replicates = replicates
        self.output_dir = trainer.args.output_dir
        self.command = command or shlex.join([os.path.basename(sys.executable), *sys.argv])
        self.peft = is_peft_model(trainer.model)
        self._validate_trainer()
        if self.peft:
            self._validate_peft(backend)
        if backend == "lockstep":
            from .lockstep_backend import LockstepBackend

            self.backend = LockstepBackend(trainer, replicates)
        else:
            from .trainer_backend import TrainerBackend

            self.backend = TrainerBackend(trainer)
        self.k = self._rewind_step()
        self.identity = run_identity(self.config, trainer.args, trainer.model, trainer.train_dataset)
        self.identity_sha256 = _json_digest(self.identity)
        # what the levels train on (name, source, copy, split sizes): recorded, not part of the identity
        self.data = data_record(
            getattr(trainer, "data_source", None), trainer.train_dataset, getattr(trainer, "eval_dataset", None)
        )
        self.template = _cpu_copy(trainer.model)
        self.level0_masks = trainer.masks
        self._weights_cache: dict[str, dict] = {}

    # ---- checks before anything runs --------------------------------------------------------------------------

    def _validate_trainer(self) -> None:
        trainer = self.trainer
        if trainer.args.load_best_model_at_end:
            raise ValueError(
                "TrainingArguments.load_best_model_at_end is not supported with an iterative method: each level must "
                "end with its last weights (the early-stop step is recorded in metrics.json instead)."
            )
        if getattr(trainer, "_user_optimizer", False):
            raise ValueError(
                "an iterative method re-creates the optimizer at every level: pass no `optimizers=` to TicketTrainer "
                "(use TrainingArguments.optim) so that rewinding can restore optimizer state."
            )

    def _validate_peft(self, backend: str) -> None:
        """A peft model's level folders and rewind point hold its adapters; the frozen base is theta_0's, pruned by
        each level's masks. What does not fit that is refused here, before any training."""
        if backend != "trainer":
            raise ValueError(
                f"backend={backend!r} does not train peft (LoRA) models: it stacks whole networks, and a peft model "
                "saves adapters, not model.safetensors. Use backend='trainer'."
            )
        if self.replicates > 1:
            raise ValueError(
                f"replicates={self.replicates} draws a new theta_0 of the whole model per replicate, which on a peft "
                "model would re-draw the pretrained base. Run each seed as its own run (own output_dir and "
                "TrainingArguments.seed, the LoRA model built under that seed)."
            )

    def _rewind_step(self) -> int:
        """k in optimizer steps; raises before any training when it cannot be reached."""
        cfg, backend = self.config, self.backend
        if backend.name == "lockstep" and cfg.rewind not in ("init", "step"):
            raise ValueError(
                f"SparsityConfig.rewind={cfg.rewind!r} is not supported by the lockstep backend: use 'init' or "
                "'step' (late rewinding), or backend='trainer'."
            )
        total = backend.total_steps()
        k = cfg.rewind_step_for(total)
        if cfg.rewind in ("step", "lr") and k >= total:
            raise ValueError(
                f"SparsityConfig.rewind_step={cfg.rewind_step} is step {k}, at or past the end of training "
                f"({total} steps per level): choose a step below {total} or a fraction such as 0.05."
            )
        return k if cfg.rewind in ("step", "lr") else 0

    def _check_controls(self, controls, control_levels) -> tuple[tuple, set]:
        controls = (controls,) if isinstance(controls, str) else tuple(controls or ())  # `controls=reinit`
        unknown = [kind for kind in controls if kind not in CONTROL_KINDS]
        if unknown:
            raise ValueError(f"control kinds {unknown} are unknown: choose from {list(CONTROL_KINDS)}.")
        if self.peft and "reinit" in controls:
            raise ValueError(
                "controls=['reinit'] is not defined for a peft (LoRA) model: the masked weights are the frozen "
                "pretrained base, so re-drawing them would train adapters on a random frozen network, and re-drawing "
                "the adapters changes weights the masks do not touch. Use controls=['random_prune'] (the same start, "
                "random masks of the same per-layer density)."
            )
        if controls and self.config.rewind not in ("init", "step"):
            raise ValueError(
                f"controls rewind like the trunk, but the trunk uses rewind={self.config.rewind!r}: controls are "
                "defined for rewind='init' or 'step'."
            )
        levels = self.config.num_levels()
        if isinstance(control_levels, int) and not isinstance(control_levels, bool):
            control_levels = [control_levels]  # `control_levels=9`
        if control_levels is not None and not isinstance(control_levels, (list, tuple, set, range)):
            raise ValueError(
                f"control_levels={control_levels!r} must be a list of pruned levels (1..{levels}), e.g. [9, 10]."
            )
        wanted = set(range(1, levels + 1)) if control_levels is None else set(control_levels)
        bad = sorted(level for level in wanted if not isinstance(level, int) or not 1 <= level <= levels)
        if bad:
            raise ValueError(f"control_levels {bad} are not pruned levels of this run (1..{levels}).")
        return controls, wanted

    # ---- the run ------------------------------------------------------------------------------------------------

    def run(self, controls=(), control_levels: Optional[list[int]] = None, train_trunk: bool = True) -> RunSummary:
        """Train every level of every replicate with `controls` at `control_levels` (default: every pruned level).

        With `train_trunk=False` only controls are trained, for trunk levels that are already finished (all of them
        by default); a level whose trunk is missing is an error.
        """
        controls, wanted = self._check_controls(controls, control_levels)
        trainer = self.trainer
        writer = trainer.args.should_save
        check_identity(self.output_dir, self.identity, write=writer and train_trunk)
        if not train_trunk:
            wanted = self._finished_trunk_levels(wanted if control_levels is not None else None)
        self._write_start_files(controls, writer)
        trainer.accelerator.wait_for_everyone()
        summary = RunSummary()
        logger.info("data: %s", data_line(self.data))
        masks = [self._level0_masks(r) for r in range(self.replicates)]
        top = self.config.num_levels() if train_trunk else max(wanted, default=0)
        planned = self.replicates * ((top + 1 if train_trunk else 0) + len(controls) * len(wanted))
        progress = Progress(planned, top)
        with run_console(trainer, self.output_dir):  # Trainer's per-step dicts to train_log.jsonl, not the console
            self._run_levels(summary, progress, masks, top, controls, wanted, train_trunk, writer)
        progress.close()
        if writer:
            from .report import write_run_report

            summary.report = write_run_report(self.output_dir, {"trained": summary.trained, "reused": summary.reused})
        trainer.accelerator.wait_for_everyone()
        self._load_last_trunk_level()
        return summary

    def _run_levels(self, summary, progress, masks, top, controls, wanted, train_trunk, writer) -> None:
        trainer = self.trainer
        for level in range(top + 1):
            if level > 0:
                masks = [self._masks_for(r, level, masks[r]) for r in range(self.replicates)]
            arms = []
            for r in range(self.replicates):
                if train_trunk:
                    arms.append(self._trunk_arm(r, level, masks[r]))
                if level in wanted:
                    arms += [self._control_arm(kind, r, level, masks[r]) for kind in controls]
            for arm in arms:  # killed while publishing: the level is finished, only its rename is missing
                if writer and not is_complete(arm.folder) and is_complete(arm.folder + PARTIAL_SUFFIX):
                    finish_publish(arm.folder + PARTIAL_SUFFIX, arm.folder)
            trainer.accelerator.wait_for_everyone()
            todo = [arm for arm in arms if not is_complete(arm.folder)]
            summary.reused += [arm.name for arm in arms if arm not in todo]
            progress.reused(len(arms) - len(todo), level)
            results = self.backend.train(todo)
            summary.trained += [arm.name for arm in todo]
            progress.trained(list(zip(todo, results)))
            for arm, metrics in zip(todo, results):
                if arm.kind == "trunk" and arm.replicate == 0:
                    summary.last_trunk_metrics = metrics

    def _level0_masks(self, r: int) -> MaskSet:
        done = level_dir(replicate_root(self.output_dir, r, self.replicates), 0)
        return MaskSet.load(done) if is_complete(done) else self.level0_masks

    def _finished_trunk_levels(self, requested: Optional[set]) -> set:
        from .layout import trunk_levels

        wanted: set = set()
        for r in range(self.replicates):
            root = replicate_root(self.output_dir, r, self.replicates)
            available = trunk_levels(root)
            levels = set(available) if requested is None else requested
            missing = sorted(level for level in levels if level not in available)
            if missing:
                raise ValueError(
                    f"trunk {root!r} has no finished pruned level {missing}: finished ones are {available}."
                )
            wanted |= levels
        return wanted

    def _write_start_files(self, controls: tuple, writer: bool) -> None:
        """theta_0 of every replicate (replicate 0: the model as given) and the reinit control's weights."""
        for r in range(self.replicates):
            root = replicate_root(self.output_dir, r, self.replicates)
            path = init_weights_path(root)
            if writer and not os.path.isfile(path):
                if r == 0:
                    os.makedirs(root, exist_ok=True)
                    save_model(self.template, path + ".tmp")
                    os.replace(path + ".tmp", path)
                else:
                    replicate_init_weights(self.template, self.config.seed + REPLICATE_SEED_OFFSET * r, path)
            if writer and "reinit" in controls:
                fresh_init_weights(self.template, self.config.seed + REINIT_SEED_OFFSET + r, reinit_weights_path(root))

    # ---- planning the arms of a level ---------------------------------------------------------------------------

    def _masks_for(self, r: int, level: int, current: MaskSet) -> MaskSet:
        """Masks of `level` for replicate r: from its folder if finished, else prune level-1's final weights."""
        root = replicate_root(self.output_dir, r, self.replicates)
        done = level_dir(root, level)
        if is_complete(done):
            return MaskSet.load(done)
        if model_is_sharded(self.trainer.model) and not self.peft:
            # FSDP2: the live model takes level-1's weights, each rank reading its rows; IMP scores the shards
            model = self.trainer.model
            load_into_(model, level_dir(root, level - 1))
            apply_masks_(model, current)
            return self.method.next_level_masks(model, current, level)
        model = _cpu_copy(self.template)
        if self.peft:  # its level folder holds the adapters; the base is theta_0, pruned by the masks below
            load_into_(model, init_weights_path(root))
        load_into_(model, level_dir(root, level - 1))
        apply_masks_(model, current)  # a no-op on a saved level's weights; prunes a peft model's theta_0 base
        return self.method.next_level_masks(model, current, level)

    def _common_metrics(self, r: int, masks: MaskSet) -> dict[str, Any]:
        return {
            "replicate": r,
            "rewind": self.config.rewind,
            "rewind_step_k": self.k,
            "config_hash": self.config.hashname(),
            "produced_by": self.command,
            "identity": {"run_sha256": self.identity_sha256, "masks_sha256": tensors_digest(sorted(masks.items()))},
            "data": self.data,
        }

    def _trunk_arm(self, r: int, level: int, masks: MaskSet) -> Arm:
        cfg = self.config
        root = replicate_root(self.output_dir, r, self.replicates)
        arm = Arm("trunk", r, level, level_dir(root, level), masks, seed=self.trainer.args.seed + r)
        arm.extra_metrics = self._common_metrics(r, masks)
        init_file, rewind_dir = init_weights_path(root), rewind_point_dir(root)
        # a peft model's level folder holds adapters (adapter_model.safetensors), read as a folder
        previous = level_dir(root, level - 1) if self.peft else os.path.join(level_dir(root, level - 1), WEIGHTS_NAME)
        if self.peft:
            arm.base_weights = init_file
        if level == 0:
            arm.weights_file = init_file
            if cfg.rewind in ("step", "lr") and self.k > 0:
                arm.capture_rewind_point, arm.capture_step = rewind_dir, self.k
        elif cfg.rewind == "init" or (cfg.rewind == "step" and self.k == 0):
            arm.weights_file = init_file
        elif cfg.rewind == "step":
            arm.rewind_point = self._rewind_point(root)
        elif cfg.rewind == "lr":
            arm.rewind_point = self._rewind_point(root) if self.k > 0 else None
            arm.weights_file = previous
        else:  # "none": fine-tune the previous level's weights at its last learning rate
            last_lr = read_metrics(level_dir(root, level - 1)).get(
                "last_learning_rate", self.trainer.args.learning_rate
            )
            arm.weights_file = previous
            arm.args_overrides = {"lr_scheduler_type": "constant", "learning_rate": float(last_lr), "warmup_steps": 0}
        self._plan_start(arm)
        return arm

    def _control_arm(self, kind: str, r: int, level: int, trunk_masks: MaskSet) -> Arm:
        root = replicate_root(self.output_dir, r, self.replicates)
        meta = dict(trunk_masks.metadata, control=kind, level=level)
        if kind == "reinit":
            masks = MaskSet({n: m.clone() for n, m in trunk_masks.items()}, meta)
        else:
            seed = self.config.seed + level + REPLICATE_SEED_OFFSET * r
            masks = MaskSet(random_masks_like(trunk_masks, seed), meta)
        arm = Arm(kind, r, level, level_dir(arm_root(root, kind), level), masks, seed=self.trainer.args.seed + r)
        if self.peft:
            arm.base_weights = init_weights_path(root)
        arm.extra_metrics = dict(
            self._common_metrics(r, masks),
            control=kind,
            trunk_dir=os.path.abspath(root),
            trunk_level=level,
            trunk_config_hash=self.config.hashname(),
            trunk_masks=os.path.join(os.path.abspath(level_dir(root, level)), MASKS_NAME),
        )
        if kind == "reinit":
            arm.weights_file = reinit_weights_path(root)
        elif self.config.rewind == "step" and self.k > 0:
            arm.rewind_point = self._rewind_point(root)
        else:
            arm.weights_file = init_weights_path(root)
        self._plan_start(arm)
        return arm

    def _rewind_point(self, root: str) -> str:
        path = rewind_point_dir(root)
        if not os.path.isdir(path):
            raise ValueError(
                f"{path} is missing: level 0 of this run must be trained (again) to make the rewind point "
                f"(step {self.k}); remove {level_dir(root, 0)} and run again."
            )
        return path

    def _plan_start(self, arm: Arm) -> None:
        """Record (and have the backend check) the masked weights the arm starts from: the rewind point's, or
        its start file's. Level 0 of a trunk and fine-tuning arms start from files too."""
        if is_complete(arm.folder):
            return
        from .rewind import rewind_point_step

        step = (rewind_point_step(arm.rewind_point) or 0) if arm.rewind_point is not None else 0
        identity = arm.extra_metrics["identity"]
        identity["start_step"] = step
        if model_is_sharded(self.trainer.model):  # FSDP2: each rank digests its rows of the start files
            from ..sharded import planned_digest

            identity["start_weights_sha256"] = planned_digest(self.trainer.model, arm.start_sources(), arm.masks)
            identity["start_weights_digest"] = "fsdp2 shards"
            return
        weights: dict = {}
        for source in arm.start_sources():  # in the order the backend loads them
            weights.update(self._saved_weights(source))
        identity["start_weights_sha256"] = masked_copy_digest(self.template, weights, dict(arm.masks))

    def _saved_weights(self, path: str) -> dict:
        """Start weights read once per run: theta_0, reinit weights and rewind points do not change once written."""
        if path not in self._weights_cache:
            self._weights_cache[path] = load_saved_weights(path, self.template)
        return self._weights_cache[path]

    # ---- after the run ------------------------------------------------------------------------------------------

    def _load_last_trunk_level(self) -> None:
        """The trainer ends holding replicate 0's last finished trunk level (weights and masks), as after train()."""
        from .layout import finished_levels

        root = replicate_root(self.output_dir, 0, self.replicates)
        levels = finished_levels(root)
        if not levels:
            return
        folder = level_dir(root, max(levels))
        if self.peft:  # the base comes from theta_0; set_masks below prunes it
            load_into_(self.trainer.model, init_weights_path(root))
        load_into_(self.trainer.model, folder)
        self.trainer.set_masks(MaskSet.load(folder))


class Progress:
    """One log line per finished arm-level: which level of how many, which arm, its accuracy, the time so far and
    an estimate of what is left (from the arm-levels trained in this call; reused ones cost nothing)."""

    def __init__(self, planned: int, levels: int) -> None:
        self.planned, self.levels = planned, levels
        self.done = self.trained_here = 0
        self.started = time.monotonic()
        self.bar = run_bar(planned)  # None unless asked for (hf-tickets run --progress) on a terminal

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def reused(self, count: int, level: int) -> None:
        if count:
            self.done += count
            if self.bar is not None:
                self.bar.update(count)
            logger.info(
                "level %d/%d: %d arm(s) reused from an earlier run with the same identity", level, self.levels, count
            )

    def trained(self, results: list[tuple[Arm, dict]]) -> None:
        """The arm-levels of one level, which the backend hands back together: one line each, and one estimate for
        all of them (counted after the whole level, so that it does not jump between lines of one pass)."""
        if not results:
            return
        elapsed = time.monotonic() - self.started
        self.trained_here += len(results)
        left = elapsed / self.trained_here * (self.planned - self.done - len(results))
        for arm, metrics in results:
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)
            self._line(arm, metrics, elapsed, left)

    def _line(self, arm: Arm, metrics: dict, elapsed: float, left: float) -> None:
        from .report import score

        accuracy = score(metrics)[0]
        logger.info(
            "level %d/%d %s[%d]: accuracy %s, %.2f%% of weights left (%d/%d arm-levels; %s elapsed, about %s left)",
            arm.level,
            self.levels,
            arm.kind,
            arm.replicate,
            "n/a" if accuracy is None else f"{100 * accuracy:.2f}%",
            metrics.get("remaining_weights_pct", 100.0),
            self.done,
            self.planned,
            _duration(elapsed),
            _duration(left),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    from .lockstep_backend import cpu_copy

    return cpu_copy(model)


def _json_digest(data: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def run_experiment(
    trainer: "LotteryTrainer",
    controls=(),
    control_levels: Optional[list[int]] = None,
    replicates: int = 1,
    backend: str = "trainer",
    command: Optional[str] = None,
) -> RunSummary:
    """Every level of the trunk, `controls` ("reinit", "random_prune") and `replicates`; see `LotteryRunner`."""
    return LotteryRunner(trainer, backend, replicates, command).run(controls, control_levels)


def run_controls(
    trainer: "LotteryTrainer",
    controls,
    levels: Optional[list[int]] = None,
    replicates: int = 1,
    backend: str = "trainer",
    command: Optional[str] = None,
) -> RunSummary:
    """Controls for finished trunk levels (default: all of them) of the run in `trainer.args.output_dir`."""
    if isinstance(controls, str):
        controls = (controls,)
    return LotteryRunner(trainer, backend, replicates, command).run(controls, levels, train_trunk=False)
