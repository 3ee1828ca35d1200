"""IMP on a LoRA model through the lottery runner (Trainer backend): the frozen base is pruned level by level from
W + ΔW, each level rewinds the adapters (and modules_to_save) to theta_0 or to step k, and the level folders load
back as base + adapters + masks. A tiny random BERT (conftest) with peft's real LoRA, on CPU."""

from __future__ import annotations

import os

import pytest
import torch

peft = pytest.importorskip("peft")
from conftest import make_bert, make_dataset, training_args  # noqa: E402
from interrupts import InterruptAt, Interrupted, TrainBegins  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402
from peft.utils import load_peft_weights  # noqa: E402
from test_peft import batch, lora_bert, violations  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer, load_sparse_adapter  # noqa: E402
from hf_tickets.lottery import run_experiment  # noqa: E402
from hf_tickets.lottery.identity import run_identity  # noqa: E402
from hf_tickets.lottery.layout import read_metrics  # noqa: E402
from hf_tickets.peft_interop import adapter_parameter_ids, effective_weights  # noqa: E402

STEPS = 6


class LevelStarts(TrainerCallback):
    """At the first step of every `Trainer.train` run (a level), after the runner loaded the level's start: the
    adapter state peft saves and the base weights."""

    def __init__(self) -> None:
        self.adapters: list[dict] = []
        self.base: list[dict] = []
        self._fresh = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._fresh = True

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self._fresh:
            return
        self._fresh = False
        self.adapters.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
        peft_ids = adapter_parameter_ids(model)
        self.base.append({n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in peft_ids})


def imp_trainer(out, masked: bool = False, **sparsity) -> tuple[TicketTrainer, LevelStarts]:
    config = SparsityConfig(method="imp", prune_fraction=0.5, levels=2, scope="layerwise", **sparsity)
    starts = LevelStarts()
    trainer = TicketTrainer(
        model=lora_bert(0, masked=masked),
        args=training_args(out, max_steps=STEPS),
        train_dataset=make_dataset("bert"),
        sparsity_config=config,
        callbacks=[starts],
    )
    return trainer, starts


def level(out, number: int) -> str:
    return os.path.join(str(out), f"level_{number:02d}")


def check_levels(out, theta0_base: dict, starts: LevelStarts) -> list[MaskSet]:
    """Exact sparsity per tensor (half of what was alive, per layer), masks that only shrink, never an adapter, the
    base at each level's start = theta_0's base with the level's zeros, and dense trained adapters."""
    masks = [MaskSet.load(level(out, n)) for n in range(3)]
    for number, current in enumerate(masks):
        assert current, number
        for name, keep in current.items():
            assert "lora_" not in name and "modules_to_save" not in name, name
            assert int(keep.sum()) == keep.numel() // 2**number, (number, name)  # the schedule, exactly
            if number:
                assert not bool((keep & ~masks[number - 1][name]).any()), (number, name)  # only shrinks
        base = starts.base[number]
        for name, value in theta0_base.items():  # pruned: exactly 0; kept: the pretrained value, bit for bit
            expected = value.masked_fill(~current[name], 0) if name in current else value
            assert torch.equal(base[name], expected), (number, name)
        saved = load_peft_weights(level(out, number))
        lora_b = [k for k in saved if "lora_B" in k]
        assert lora_b and all(bool((saved[k] != 0).all()) for k in lora_b), number  # adapters dense, trained
    return masks


def theta0_parts(model) -> tuple[dict, dict]:
    peft_ids = adapter_parameter_ids(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in peft_ids}
    adapters = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return base, adapters


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key].cpu(), value.cpu()), key


def test_imp_on_lora_rewinds_adapters_to_theta0_and_prunes_the_base(tmp_path):
    out = tmp_path / "run"
    trainer, starts = imp_trainer(out)
    theta0_base, theta0_adapters = theta0_parts(trainer.model)
    trainer.train()  # an iterative method: every level of the trunk

    assert len(starts.adapters) == 3
    for number in range(3):  # every level starts from theta_0's adapters and classifier, bit for bit
        assert_same(starts.adapters[number], theta0_adapters)
    masks = check_levels(out, theta0_base, starts)

    # Level 1's masks are the largest |W + ΔW| of level 0's final model (the effective weight, not W alone).
    ended = load_sparse_adapter(make_bert(0), level(out, 0))
    with effective_weights(ended):
        effective = {n: p.detach().abs().clone() for n, p in ended.named_parameters() if n in masks[1]}
    for name, keep in masks[1].items():
        assert effective[name][keep].min() >= effective[name][~keep].max(), name

    # The trainer ends holding the last level; the level folder loads back with the project's peft loader.
    loaded = load_sparse_adapter(make_bert(0), level(out, 2))
    assert violations(loaded, masks[2]) == 0
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, trainer.model(**batch()).logits, rtol=0, atol=0)


def test_imp_on_masked_lora_with_late_rewinding_and_random_prune_control(tmp_path):
    out = tmp_path / "run"
    trainer, starts = imp_trainer(out, masked=True, rewind="step", rewind_step=2)
    theta0_base, theta0_adapters = theta0_parts(trainer.model)
    summary = run_experiment(trainer, controls=["random_prune"])
    assert summary.trained == [
        "trunk[0] level 0",
        "trunk[0] level 1",
        "random_prune[0] level 1",
        "trunk[0] level 2",
        "random_prune[0] level 2",
    ]
    point = load_peft_weights(str(out / "rewind_point"))  # step k of level 0: what peft saved there
    assert any(not torch.equal(point[k], theta0_adapters[k]) for k in point)  # k steps of training moved them
    trunk = [0, 1, 3]  # the trunk's levels among the train() runs; 2 and 4 are the control's
    assert_same(starts.adapters[0], theta0_adapters)
    for run in (1, 2, 3, 4):  # every later level, and the control, restart from step k's adapters, bit for bit
        assert_same(starts.adapters[run], point)
    check_levels(out, theta0_base, picked(starts, trunk))
    control = MaskSet.load(os.path.join(f"{out}.random_prune", "level_02"))
    trunk_masks = MaskSet.load(level(out, 2))
    assert control != trunk_masks
    assert all(int(control[n].sum()) == int(trunk_masks[n].sum()) for n in trunk_masks)  # same per-layer density
    assert violations(trainer.model, trunk_masks) == 0
    assert trainer.model.hf_tickets_masked_lora.masks is trainer.masks  # masked LoRA follows the level's masks


def picked(starts: LevelStarts, runs: list[int]) -> LevelStarts:
    """The level starts of the train() runs `runs` (the trunk's, without the control's)."""
    out = LevelStarts()
    out.adapters = [starts.adapters[i] for i in runs]
    out.base = [starts.base[i] for i in runs]
    return out


@pytest.mark.parametrize(
    "case, match",
    [
        ("lockstep", "does not train peft"),
        ("reinit", "'reinit'] is not defined for a peft"),
        ("replicates", "re-draw the pretrained base"),
        ("trainable_base", "base weights are trainable"),
    ],
)
def test_what_imp_on_lora_cannot_do_is_refused_before_training(tmp_path, case, match):
    trained = []

    class Never(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            trained.append(1)

    with pytest.raises(ValueError, match=match):
        if case == "trainable_base":
            model = lora_bert(0)
            model.base_model.model.bert.encoder.layer[0].attention.self.key.weight.requires_grad_(True)
            TicketTrainer(
                model=model,
                args=training_args(tmp_path),
                train_dataset=make_dataset("bert"),
                sparsity_config=SparsityConfig(method="imp", levels=1),
            )
        trainer, _ = imp_trainer(tmp_path / "run")
        trainer.add_callback(Never())
        kwargs = {"backend": "lockstep"} if case == "lockstep" else {}
        kwargs.update({"controls": ["reinit"]} if case == "reinit" else {})
        kwargs.update({"replicates": 2} if case == "replicates" else {})
        run_experiment(trainer, **kwargs)
    assert not trained
    assert not os.path.isdir(level(tmp_path / "run", 0))


def test_lora_settings_are_part_of_the_run_identity(tmp_path):
    """lora_alpha changes training but not theta_0's weights: a restart with another one must not reuse levels."""
    args, data = training_args(tmp_path), make_dataset("bert")
    config = SparsityConfig(method="imp", levels=1)
    a = run_identity(config, args, lora_bert(0), data)
    b = run_identity(config, args, lora_bert(0, lora_alpha=16), data)
    assert a["model"]["init_sha256"] == b["model"]["init_sha256"]
    assert a["model"]["peft"] != b["model"]["peft"]
    assert a == run_identity(config, args, lora_bert(0), data)  # deterministic (target_modules is a set)
    assert "peft" not in run_identity(config, args, make_bert(0), data)["model"]


def test_extending_a_lora_imp_run_reuses_its_levels_and_ends_as_one_straight_run(tmp_path):
    """A restart with more levels (new trainer, new model) reuses levels 0-1 from their adapter folders and trains
    level 2 exactly as a run of 3 levels does. rewind='lr': level L starts from level L-1's adapters."""

    def trainer(out, levels):
        config = SparsityConfig(
            method="imp", prune_fraction=0.5, levels=levels, scope="layerwise", rewind="lr", rewind_step=2
        )
        args = training_args(out, max_steps=STEPS)
        return TicketTrainer(model=lora_bert(0), args=args, train_dataset=make_dataset("bert"), sparsity_config=config)

    straight, extended = tmp_path / "straight", tmp_path / "extended"
    run_experiment(trainer(straight, 2))
    run_experiment(trainer(extended, 1))
    summary = run_experiment(trainer(extended, 2))
    assert summary.reused == ["trunk[0] level 0", "trunk[0] level 1"] and summary.trained == ["trunk[0] level 2"]
    assert MaskSet.load(level(straight, 2)) == MaskSet.load(level(extended, 2))
    assert_same(load_peft_weights(level(extended, 2)), load_peft_weights(level(straight, 2)))


def checkpointed_trainer(out, callbacks=()) -> TicketTrainer:
    """2 pruned levels, late rewinding to step 2, a checkpoint every 2 steps and an evaluation every 3."""
    from hf_tickets.lottery.metrics import accuracy

    config = SparsityConfig(
        method="imp", prune_fraction=0.5, levels=2, scope="layerwise", rewind="step", rewind_step=2
    )
    args = training_args(
        out, max_steps=STEPS, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=3
    )
    return TicketTrainer(
        model=lora_bert(0),
        args=args,
        train_dataset=make_dataset("bert"),
        eval_dataset=make_dataset("bert", n=16, seed=1),
        compute_metrics=accuracy,
        sparsity_config=config,
        callbacks=list(callbacks),
    )


def test_a_lora_imp_level_interrupted_mid_level_resumes_from_its_checkpoint_and_ends_as_a_straight_run(tmp_path):
    """Level 1 stops at step 5 (checkpoint-4 written). A new process (new model, new trainer, same output_dir)
    reuses level 0, resumes level 1 from checkpoint-4 (masked theta_0 base, then the checkpoint's adapters) and
    trains level 2: levels 1-2 end bit-equal to an uninterrupted run, metrics included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_experiment(checkpointed_trainer(straight))

    with pytest.raises(Interrupted):
        run_experiment(checkpointed_trainer(resumed, [InterruptAt("level_01", 5)]))
    assert os.path.isfile(os.path.join(level(resumed, 0), "metrics.json"))
    assert not os.path.exists(level(resumed, 1))
    partial = level(resumed, 1) + ".partial"
    assert os.path.isdir(os.path.join(partial, "checkpoint-4"))
    assert not os.path.exists(os.path.join(partial, "checkpoint-6"))

    begins = TrainBegins()
    trainer = checkpointed_trainer(resumed, [begins])
    summary = run_experiment(trainer)
    assert summary.reused == ["trunk[0] level 0"]
    assert summary.trained == ["trunk[0] level 1", "trunk[0] level 2"]
    assert begins.steps == [4, 2]  # level 1 from its own checkpoint-4; level 2 from the rewind point (step 2)

    for number in (1, 2):
        assert MaskSet.load(level(resumed, number)) == MaskSet.load(level(straight, number)), number
        assert_same(load_peft_weights(level(resumed, number)), load_peft_weights(level(straight, number)))
        got, expected = (read_metrics(level(run, number)) for run in (resumed, straight))
        assert "accuracy" in expected["final_eval"], expected  # evaluations were recorded
        assert got["final_eval"]["accuracy"] == expected["final_eval"]["accuracy"]
        got.pop("produced_by"), expected.pop("produced_by")
        assert got == expected, {
            k: (got.get(k), expected.get(k)) for k in set(got) | set(expected) if got.get(k) != expected.get(k)
        }
    masks = MaskSet.load(level(straight, 2))
    assert violations(trainer.model, masks) == 0  # the trainer ends holding level 2: masked base + its adapters
    reference = load_sparse_adapter(make_bert(0), level(straight, 2))
    trainer.model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**batch()).logits, reference(**batch()).logits, rtol=0, atol=0)


def test_imp_on_lora_with_rewind_none_fine_tunes_the_previous_levels_adapters(tmp_path):
    """rewind='none': level L starts from level L-1's final adapters (no rewind) at its last learning rate, on
    theta_0's base under level L's masks (kept weights the pretrained ones, bit for bit)."""
    out = tmp_path / "run"
    trainer, starts = imp_trainer(out, rewind="none")
    trainer.args.lr_scheduler_type = "constant"  # a linear schedule ends at lr 0: the fine-tuning would not move
    theta0_base, theta0_adapters = theta0_parts(trainer.model)
    summary = run_experiment(trainer)
    assert summary.trained == [f"trunk[0] level {n}" for n in range(3)]
    assert len(starts.adapters) == 3
    assert_same(starts.adapters[0], theta0_adapters)
    for number in (1, 2):  # the previous level's adapters, as saved in its folder, bit for bit
        previous = load_peft_weights(level(out, number - 1))
        assert_same(starts.adapters[number], previous)
        assert any(not torch.equal(previous[k], theta0_adapters[k]) for k in previous)  # not rewound to theta_0
        ended = load_peft_weights(level(out, number))
        assert any(not torch.equal(ended[k], previous[k]) for k in ended)  # and it trained on
        metrics = read_metrics(level(out, number))
        assert metrics["rewind"] == "none"
        assert metrics["last_learning_rate"] == read_metrics(level(out, number - 1))["last_learning_rate"] == 1e-2
    masks = check_levels(out, theta0_base, starts)
    assert violations(trainer.model, masks[2]) == 0
