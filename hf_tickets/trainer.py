"""`TicketTrainer`: a drop-in `transformers.Trainer` that trains sparse models with any registered method.

Built like `Trainer` (no sparsity arguments, or nothing to mask), it *is* `Trainer`: same callbacks, logs, outputs
and checkpoints. With a `SparsityConfig` it builds the method and one `SparsityCallback` (hooks + enforcement) and
saves the masks with every checkpoint and model. An iterative method (IMP) trains its trunk level by level through
`hf_tickets.lottery.LotteryRunner` (imported when `train()` needs it); controls, replicates and the lockstep backend
are run with `hf_tickets.lottery.run_experiment`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from .callbacks import SparsityCallback
from .cards import card_tags, current_command, write_mask_updates_section, write_model_card
from .checkpoints import last_complete_checkpoint, load_saved_weights, saved_under_other_names
from .config import SparsityConfig
from .distributed import check_supported
from .files import CARD_NAME, STATE_TENSORS_NAME, write_text_atomic
from .masks import MASKS_NAME, MaskSet
from .methods import SparsityMethod, build_method
from .peft_methods import prepare_method
from .sparsify import MASKS_ATTR

logger = logging.getLogger(__name__)

ONE_SHOT_DESCRIPTIONS = ("magnitude", "random")  # methods that describe loaded masks without changing them


class TicketTrainer(Trainer):
    """`transformers.Trainer` that trains a sparse model and saves its masks.

    Args:
        sparsity_config: how to prune (any registered method). Masks are computed when the trainer is built, from
            the model (and, for data-driven methods, batches of the trainer's own train dataloader), and pruned
            weights are zeroed in place; with `model_init`, they are computed again for every model it builds.
        masks: an existing `MaskSet` (e.g. from `load_masks`) to enforce instead of computing new masks.
        *args, **kwargs: every `transformers.Trainer` argument, `model_init` included.

    A model already passed through `apply_sparsity` keeps its masks when neither argument is given. Without any of
    these, or when nothing ends up masked by a method that acts only before training, the trainer is exactly
    `Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        sparsity_config: Optional[SparsityConfig] = None,
        masks: Optional[MaskSet] = None,
        **kwargs: Any,
    ) -> None:
        if "engine" in kwargs:
            raise TypeError(
                "TicketTrainer(engine=...) was replaced by hf_tickets.lottery.run_experiment(trainer, backend=...): "
                "build the trainer without `engine` and pass backend='trainer' or 'lockstep' there."
            )
        if sparsity_config is not None and not isinstance(sparsity_config, SparsityConfig):
            raise ValueError(f"sparsity_config must be a SparsityConfig, got {type(sparsity_config).__name__}.")
        if masks is not None and not isinstance(masks, MaskSet):
            raise ValueError(f"masks must be a MaskSet (e.g. load_masks(path)), got {type(masks).__name__}.")
        super().__init__(*args, **kwargs)
        # Sees every micro-step's loss (the lottery's Trainer backend keeps a level's exact mean across resumes).
        self.loss_observer: Optional[Callable[[torch.Tensor], None]] = None
        self.card_charts = True  # False: saved cards skip the per-layer chart (the lottery's level folders)
        if masks is None and sparsity_config is None:
            masks = getattr(self.model, MASKS_ATTR, None)
        if sparsity_config is None and masks is not None:
            sparsity_config = _config_from_masks(masks)
        self.sparsity_config = sparsity_config
        self.sparsity_method: Optional[SparsityMethod] = None
        self.sparsity_callback: Optional[SparsityCallback] = None
        self._user_optimizer = (kwargs.get("optimizers") or (None, None))[0] is not None
        if sparsity_config is None:
            return
        # A peft model: rejects combinations that cannot hold, and scores W + ΔW of its LoRA layers.
        self.sparsity_method = prepare_method(self.model, build_method(sparsity_config))
        # DeepSpeed ZeRO-3, FSDP1, or a method whose masks this launch cannot keep: refused before any training.
        check_supported(self.args, self.accelerator, self.sparsity_method)
        callback = SparsityCallback(method=self.sparsity_method)
        batches = self._train_batches if self.train_dataset is not None else None
        callback.setup(self.model, batches=batches, masks=masks)
        self._masks_without_callback: Optional[MaskSet] = None
        if callback.masks.sparsity() > 0 or self.sparsity_method.acts_during_training():
            self.sparsity_callback = callback
            self.add_callback(callback)
        else:  # nothing is masked and nothing will change: this trainer is Trainer
            self._masks_without_callback = callback.masks

    def _train_batches(self) -> Iterator[dict]:
        """Batches of the trainer's own train dataloader, for methods that score weights on data. Reading them
        must not shift training: the RNG states are restored when the method stops reading."""
        loader = self.get_train_dataloader()
        with torch.random.fork_rng():
            yield from loader

    @property
    def masks(self) -> Optional[MaskSet]:
        """The masks being enforced (None without a sparsity config)."""
        if self.sparsity_callback is not None:
            return self.sparsity_callback.masks
        return getattr(self, "_masks_without_callback", None)

    def set_masks(self, masks: MaskSet) -> None:
        """Enforce `masks` from now on (zeroes the newly pruned weights at once and their optimizer state)."""
        if self.sparsity_callback is None:
            raise ValueError("this TicketTrainer has no sparsity method: build it with sparsity_config= or masks=.")
        self.sparsity_callback.set_masks(masks, self.optimizer)

    # ---- training loop hooks ----------------------------------------------------------------------------------

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.loss_observer is not None:
            self.loss_observer(loss)
        # After the last micro-step's backward (Trainer sets sync_gradients for it), before clipping: the method
        # sees dense gradients, then the pruned ones are zeroed, so clipping uses the sparse network's norm.
        if self.sparsity_callback is not None and self.accelerator.sync_gradients:
            self.sparsity_callback.dense_grads_ready(self.model, self.state.global_step + 1)
        return loss

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any) -> TrainOutput:
        """Train; an iterative method trains every level of its trunk (`hf_tickets.lottery.LotteryRunner`).

        For an iterative method, `resume_from_checkpoint` is implied: finished levels in `output_dir` are reused
        when the run's identity matches and an interrupted level resumes from its last checkpoint. Its
        `TrainOutput.metrics` hold the last trained level's summary. Controls and replicates:
        `hf_tickets.lottery.run_experiment(trainer, controls=..., replicates=...)`.
        """
        if self.sparsity_method is None or not self.sparsity_method.iterative:
            return self.train_once(resume_from_checkpoint, *args, **kwargs)
        from .lottery.runner import LotteryRunner  # here, not at import: the lottery package builds on this module

        metrics = dict(LotteryRunner(self).run().last_trunk_metrics)
        return TrainOutput(self.state.global_step, float(metrics.get("train_loss", 0.0)), metrics)

    def train_once(
        self, resume_from_checkpoint=None, *args: Any, restore_masks: bool = True, **kwargs: Any
    ) -> TrainOutput:
        """One `Trainer.train` run (what `train()` is for a non-iterative method; the lottery runner calls it once
        per level). With `restore_masks`, masks saved in the checkpoint resumed from replace the current ones; the
        runner turns it off to resume a level's rewind point (a level-0 checkpoint) under the level's own masks."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
            # None: Trainer's own "no valid checkpoint" error, as with stock Trainer
            resume_from_checkpoint = checkpoint if checkpoint is not None else True
        if (
            restore_masks
            and self.sparsity_callback is not None
            and isinstance(checkpoint, (str, os.PathLike))
            and os.path.isfile(os.path.join(checkpoint, MASKS_NAME))
        ):
            logger.info("Restoring masks from %s", checkpoint)
            self.set_masks(MaskSet.load(checkpoint))
            tensors = os.path.join(checkpoint, STATE_TENSORS_NAME)
            if os.path.isfile(tensors):
                from safetensors.torch import load_file

                self.sparsity_method.load_state_tensors(load_file(tensors))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- loading ----------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        model = model if model is not None else self.model
        if not self._load_by_name(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_by_name(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_by_name(self, folder: str, model: torch.nn.Module) -> bool:
        """Load a checkpoint saved under other tensor names (ViT in transformers 5) by the model's own names.

        Trainer loads `model.safetensors` with `load_state_dict(strict=False)`: for such a model it loads none of
        the renamed tensors, logs "missing keys" and trains on from the weights it had, so a resumed run silently
        restarts its encoder. Returns False (Trainer's own load) for every other checkpoint: matching names,
        sharded or adapter files, FSDP, DeepSpeed."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not saved_under_other_names(folder, model):
            return False
        logger.info("Loading %s by the model's own tensor names (it was saved under other names)", folder)
        weights = load_saved_weights(folder, model)
        device = next(model.parameters()).device
        model.load_state_dict({name: tensor.to(device) for name, tensor in weights.items()}, strict=True)
        return True

    def _load_callback_state(self) -> None:
        # With restore_callback_states_from_checkpoint=True, Trainer rebuilds stateful callbacks from their stored
        # args; ours holds the method and masks, so it is kept and restores itself at train begin.
        ours = self.sparsity_callback
        super()._load_callback_state()
        if ours is not None and ours not in self.callback_handler.callbacks:
            self.callback_handler.remove_callback(SparsityCallback)
            self.callback_handler.add_callback(ours)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add overall sparsity to every log, and per-layer sparsity to the first log after the masks change.

        Per-layer values only change with the masks, so repeating ~one key per layer on every line would only
        bury the loss in the console and in `report_to` backends.
        """
        if self.sparsity_callback is not None:
            logs = {**logs, **self.sparsity_callback.log_entries()}
        super().log(logs, *args, **kwargs)

    # ---- saving -----------------------------------------------------------------------------------------------

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        if self.sparsity_callback is not None:  # the method's saved form and its checks (N:M: validate_nm)
            self.sparsity_method.before_save(self.model, self.masks)
        super()._save(output_dir, state_dict=state_dict)
        # Under FSDP every rank calls _save (to join the state-dict gather); only the writer saves files.
        if self.sparsity_callback is not None and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            self.masks.save(output_dir)
            self.sparsity_config.save_pretrained(output_dir)
            tensors = self.sparsity_method.state_tensors()
            if tensors:
                from safetensors.torch import save_file

                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    os.path.join(output_dir, STATE_TENSORS_NAME),
                )

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.sparsity_callback is not None and not _internal_call and self.args.should_save:
            self._write_card(output_dir if output_dir is not None else self.args.output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Trainer's card (training summary and its metadata), with every hf_tickets section of the card already in
        `output_dir` kept (Trainer rewrites README.md from scratch before `push_to_hub`), the sparsity section
        rebuilt and the method's tags added."""
        from .cards import get_section, section_keys, set_section

        path = os.path.join(self.args.output_dir, CARD_NAME)
        old = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
        if self.sparsity_callback is not None:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in card_tags(self.sparsity_config) if t not in tags]
        super().create_model_card(*args, **kwargs)
        if self.sparsity_callback is None or not self.is_world_process_zero():
            return
        text = open(path, encoding="utf-8").read()
        for key in section_keys(old):
            key = None if key == "main" else key
            text = set_section(text, key, get_section(old, key) or "")
        write_text_atomic(path, text)
        self._write_card(self.args.output_dir)

    def _write_card(self, folder: str) -> None:
        write_model_card(
            folder,
            masks=self.masks,
            config=self.sparsity_config,
            model=self.model,
            metrics=_last_eval_metrics(self.state.log_history),
            command=current_command(),
            chart=self.card_charts,
        )
        write_mask_updates_section(folder, self.state.log_history)

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs: Any,
    ):
        """`Trainer.push_to_hub`, tagged with the method (`sparse`, `lottery-ticket`, `rigl`, `2:4`, ...): the folder
        holds the dense weights with exact zeros, masks.safetensors, sparsity_config.json, the card and its plots.

        For an IMP run whose levels are in `output_dir`, the whole run is published instead
        (`hf_tickets.hub.push_lottery_run`): each level on its own branch, `main` = the ticket, the card linking
        them. `kwargs` go to `create_model_card` as for Trainer (`tags`, `license`, `dataset`, ...)."""
        if self.sparsity_callback is None:
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        from .lottery.layout import finished_levels, replicate_roots

        if self.sparsity_method.iterative and any(finished_levels(r) for r in replicate_roots(self.args.output_dir)):
            if not self.is_world_process_zero():
                return None
            from .hub import push_lottery_run

            token = token if token is not None else self.args.hub_token
            if self.hub_model_id is None:
                self.init_hf_repo(token=token, private=private)
            extra = kwargs.get("tags") or []
            result = push_lottery_run(
                self.args.output_dir,
                self.hub_model_id,
                token=token,
                tags=[extra] if isinstance(extra, str) else list(extra),
                commit_message=None if commit_message == "End of training" else commit_message,
            )
            return result["main"]
        return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)


def _config_from_masks(masks: MaskSet) -> SparsityConfig:
    """A config describing masks that came without one (loaded from a file)."""
    meta = masks.metadata
    # Loaded masks are enforced as they are: describe them as one-shot, never restart a method that changes masks.
    method = str(meta.get("method", "magnitude"))
    if method not in ONE_SHOT_DESCRIPTIONS:
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
