"""A tiny BERT under `TicketTrainer` and accelerate's own FSDP2 preparation (2 gloo ranks, `fsdp2_launch`), or in one
process as the reference: gradual magnitude pruning during training, IMP through the lottery runner (`imp_resume`:
interrupted mid-level, then resumed by a new trainer), and fixed magnitude masks (the baseline: training alone
equal on 1 and 2 processes).

accelerate wraps the BERT as on a GPU (one FSDP2 group per `BertLayer`, the root), so the parameters are DTensors
while `after_optimizer_step` (gradual) and the level loop (IMP) compute masks. Dropout is off, so that 2 ranks of 4
samples and one process of 8 train the same function on the same batches. The test compares the two runs' files.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_trainer_worker.py OUT MODE   # 2 ranks, FSDP2
    python tests/fsdp2_trainer_worker.py OUT MODE                                                 # one process

MODE: gradual, imp, imp_resume or magnitude; gpt2_imp: IMP on a tiny GPT-2 whose LM head is tied to the input
embedding (one group per `GPT2Block`), recording after every level's load whether the two names still share one
tensor and hold equal values.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_bert, make_dataset, make_gpt2, training_args  # noqa: E402
from fsdp2_launch import enter_fsdp2  # noqa: E402
from interrupts import InterruptAt, Interrupted, TrainBegins  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tickets import SparsityConfig, TicketTrainer  # noqa: E402
from hf_tickets.distributed import masks_digest, model_is_sharded  # noqa: E402

GLOBAL_BATCH = 8
CONFIGS = {
    "magnitude": dict(method="magnitude", sparsity=0.6, scope="global"),
    "gradual": dict(method="gradual", sparsity=0.6, end_step=6, update_interval=2, scope="global"),
    "rigl": dict(method="rigl", sparsity=0.6, update_interval=2, drop_fraction=0.3, stop_fraction=0.75, seed=5),
    "set": dict(method="set", sparsity=0.6, update_interval=2, drop_fraction=0.3, stop_fraction=0.75, seed=5),
    "imp": dict(method="imp", levels=2, prune_fraction=0.3, rewind="step", rewind_step=2, scope="layerwise"),
}
CONFIGS["gpt2_imp"] = CONFIGS["imp"]


class Tied(TrainerCallback):
    """At the first step of every `Trainer.train` (an arm, after its start weights are loaded) and at its end:
    whether GPT-2's `lm_head.weight` is still `transformer.wte.weight` and this rank's shards of the two are equal."""

    def __init__(self) -> None:
        self.checks: list = []
        self.fresh = False

    def _check(self, args, model) -> None:
        from hf_tickets.distributed import local

        head, wte = model.lm_head.weight, model.transformer.wte.weight
        arm = os.path.relpath(args.output_dir, os.path.dirname(os.path.dirname(args.output_dir)))
        self.checks.append((arm, head is wte, bool((local(head) == local(wte)).all())))

    def on_train_begin(self, args, state, control, **kwargs):
        self.fresh = True

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.fresh:
            self.fresh = False
            self._check(args, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._check(args, model)


class Record(TrainerCallback):
    """The masks' digest after every optimizer step, and whether the parameters were DTensors then."""

    def __init__(self, trainer: TicketTrainer) -> None:
        self.trainer = trainer
        self.steps: list = []
        self.sharded: list = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append((state.global_step, masks_digest(self.trainer.masks)))
        self.sharded.append(model_is_sharded(model))


def main(out: str, mode: str) -> None:
    distributed = "LOCAL_RANK" in os.environ
    enter_fsdp2(layer_cls=["GPT2Block" if mode.startswith("gpt2") else "BertLayer"])
    world = int(os.environ.get("WORLD_SIZE", 1))
    result: dict = {"world_size": world}
    if mode == "imp_resume":  # level 1 stops at step 5 (checkpoint-4 written); a new trainer and model go on
        from hf_tickets.lottery import run_experiment

        try:
            run_experiment(build(out, "imp", world, distributed, InterruptAt("level_01", 5)))
        except Interrupted:
            result["interrupted"] = True
        result["checkpoints"] = sorted(os.listdir(os.path.join(out, "level_01.partial")))
        begins = TrainBegins()
        summary = run_experiment(build(out, "imp", world, distributed, begins))
        result.update(reused=summary.reused, trained=summary.trained, begins=begins.steps)
    else:
        trainer = build(out, mode, world, distributed)
        record, tied = Record(trainer), Tied()
        trainer.add_callback(record)
        if mode.startswith("gpt2"):
            trainer.add_callback(tied)
        if not mode.endswith("imp"):
            trainer.train()
            trainer.save_model()
        else:
            from hf_tickets.lottery import run_experiment

            run_experiment(trainer, controls=["random_prune"], control_levels=[2])
        result.update(steps=record.steps, sharded=record.sharded, tied=tied.checks)
    if mode.startswith("gpt2") or int(os.environ.get("RANK", 0)) == 0:
        suffix = f"_rank{os.environ.get('RANK', 0)}" if mode.startswith("gpt2") else ""
        with open(os.path.join(out, f"record{suffix}.json"), "w") as fh:
            json.dump(result, fh)


def build(out: str, mode: str, world: int, distributed: bool, *callbacks: TrainerCallback) -> TicketTrainer:
    model = make_gpt2(seed=0) if mode.startswith("gpt2") else make_bert(seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if module.__class__.__name__ == "Dropout":
            module.p = 0.0
    checkpoints = dict(save_strategy="steps", save_steps=2) if callbacks else {}
    args = training_args(
        out,
        max_steps=6 if mode.endswith("imp") else 8,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        # BERT's classification loss is a per-batch mean that ignores num_items_in_batch, so Trainer's loss x ranks
        # for token averaging would double the gradient on 2 ranks: plain averaging of the ranks' means instead
        average_tokens_across_devices=False,
        accelerator_config={"use_configured_state": True} if distributed else None,
        **checkpoints,
    )
    return TicketTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset("gpt2" if mode.startswith("gpt2") else "bert", 64),
        sparsity_config=SparsityConfig(**CONFIGS[mode]),
        callbacks=list(callbacks),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
