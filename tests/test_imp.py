"""IMP with rewinding and the LTH controls, on a tiny MLP and random data (CPU, deterministic)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from hf_tickets import MaskSet, SparsityConfig, TicketTrainer
from hf_tickets.lottery import run_controls
from hf_tickets.models import build_model


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return ArrayDataset(x, x.flatten(1)[:, :10].argmax(1))


def accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


class StartRecorder(TrainerCallback):
    """Weights, step and LR as each train() call takes its first step (after every on_train_begin hook)."""

    def __init__(self):
        self.starts = []
        self._armed = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._armed = True

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self._armed:
            self._armed = False
            self.starts.append(
                {
                    "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "step": state.global_step,
                    "lr": lr_scheduler.get_last_lr()[0],
                }
            )


class Crash(TrainerCallback):
    def __init__(self, level_dir_name, step):
        self.level_dir_name, self.step = level_dir_name, step

    def on_step_end(self, args, state, control, **kwargs):
        if os.path.basename(args.output_dir).startswith(self.level_dir_name) and state.global_step == self.step:
            raise RuntimeError("simulated crash")


def make_trainer(out, config, callbacks=(), seed=0, **arg_overrides):
    torch.manual_seed(seed)
    model = build_model("lenet_300_100", num_channels=1, image_size=8, hidden_sizes=[32, 16])
    kwargs = dict(
        max_steps=20,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=5,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )
    kwargs.update(arg_overrides)
    return TicketTrainer(
        model=model,
        args=TrainingArguments(str(out), **kwargs),
        train_dataset=_data(160, 1),
        eval_dataset={"validation": _data(48, 2), "test": _data(48, 3)},
        compute_metrics=accuracy,
        sparsity_config=config,
        callbacks=list(callbacks),
    )


def level_masks(root, levels):
    return [MaskSet.load(os.path.join(root, f"level_{level:02d}")) for level in range(levels + 1)]


def test_imp_rewind_to_init_is_bit_exact_and_masks_nest(tmp_path):
    recorder = StartRecorder()
    cfg = SparsityConfig(method="imp", levels=3, prune_fraction=0.2, rewind="init")
    trainer = make_trainer(tmp_path, cfg, [recorder])
    trainer.train()
    masks = level_masks(tmp_path, 3)
    theta0 = load_file(os.path.join(tmp_path, "init_weights.safetensors"))
    # masks only shrink, with the exact per-level count
    for prev, cur in zip(masks, masks[1:]):
        assert cur.is_subset_of(prev)
        assert cur.kept() == prev.kept() - round(0.2 * prev.kept())
    assert masks[0].sparsity() == 0.0
    assert abs(masks[3].sparsity() - (1 - 0.8**3)) < 1e-3
    assert len(recorder.starts) == 4
    for level in range(1, 4):
        start = recorder.starts[level]
        assert start["step"] == 0
        for name, mask in masks[level].items():
            w = start["weights"][name]
            assert torch.equal(w[mask], theta0[name][mask])  # survivors are theta_0, bit for bit
            assert torch.count_nonzero(w[~mask]) == 0
    # the rewind target is a copy: training moved the live weights away from it
    final0 = load_file(os.path.join(tmp_path, "level_00", "model.safetensors"))
    name = next(iter(masks[0]))
    assert not torch.equal(final0[name], theta0[name])
    # per-level outputs and the report
    metrics = json.load(open(os.path.join(tmp_path, "level_02", "metrics.json")))
    assert metrics["level"] == 2 and abs(metrics["remaining_weights_pct"] - 100 * masks[2].density()) < 1e-9
    assert {"final_eval", "best_eval", "early_stop_step", "test_at_early_stop"} <= set(metrics)
    assert metrics["early_stop_step"] in (5, 10, 15, 20)
    report = json.load(open(os.path.join(tmp_path, "imp_report.json")))
    assert [row["level"] for row in report["trunk"]] == [0, 1, 2, 3]
    assert report["dense_accuracy"] == metrics_of(tmp_path, 0)["test_at_early_stop"]["accuracy"]
    assert os.path.getsize(os.path.join(tmp_path, "imp_accuracy.png")) > 1000
    assert os.path.getsize(os.path.join(tmp_path, "imp_early_stop.png")) > 1000
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


def metrics_of(root, level):
    return json.load(open(os.path.join(root, f"level_{level:02d}", "metrics.json")))


def test_late_rewinding_restores_weights_step_and_schedule(tmp_path):
    recorder = StartRecorder()
    cfg = SparsityConfig(method="imp", levels=2, rewind="step", rewind_step=6)
    trainer = make_trainer(tmp_path, cfg, [recorder], lr_scheduler_type="linear")
    trainer.train()
    masks = level_masks(tmp_path, 2)
    rewind = load_file(os.path.join(tmp_path, "rewind_point", "model.safetensors"))
    level0_at_k = None
    for level in (1, 2):
        start = recorder.starts[level]
        assert start["step"] == 6  # training resumes at k, with the scheduler where it was at k
        assert start["lr"] == pytest.approx(5e-3 * (20 - 6) / 20)
        for name, mask in masks[level].items():
            assert torch.equal(start["weights"][name][mask], rewind[name][mask])
            assert torch.count_nonzero(start["weights"][name][~mask]) == 0
        level0_at_k = level0_at_k or metrics_of(tmp_path, level)["rewind_step_k"]
    assert level0_at_k == 6
    # the rewind point holds step-6 weights, not the initial or the final ones
    theta0 = load_file(os.path.join(tmp_path, "init_weights.safetensors"))
    final0 = load_file(os.path.join(tmp_path, "level_00", "model.safetensors"))
    name = next(iter(masks[0]))
    assert not torch.equal(rewind[name], theta0[name]) and not torch.equal(rewind[name], final0[name])
    # ... and it is a copy: changing the live model in place never changes it
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    again = load_file(os.path.join(tmp_path, "rewind_point", "model.safetensors"))
    assert all(torch.equal(again[n], rewind[n]) for n in rewind)


def test_fraction_rewind_step_and_optimizer_state_of_pruned_weights(tmp_path):
    seen = {}

    class OptimizerProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if "level_01" in args.output_dir and "checked" not in seen:
                seen["checked"] = True
                params = dict(model.named_parameters())
                inner = getattr(optimizer, "optimizer", optimizer)
                masks = trainer.masks
                for name, mask in masks.items():
                    for value in inner.state[params[name]].values():
                        if torch.is_tensor(value) and value.shape == mask.shape:
                            seen.setdefault("violations", 0)
                            seen["violations"] += int(torch.count_nonzero(value[~mask]))
                            seen.setdefault("alive_state", 0)
                            seen["alive_state"] += int(torch.count_nonzero(value[mask]))

    cfg = SparsityConfig(method="imp", levels=1, rewind="step", rewind_step=0.25)
    trainer = make_trainer(tmp_path, cfg, [OptimizerProbe()])
    trainer.train()
    assert metrics_of(tmp_path, 1)["rewind_step_k"] == 5
    assert seen["violations"] == 0  # Adam moments of pruned weights were zeroed on rewind
    assert seen["alive_state"] > 0  # ... while survivors kept the moments of step k


def test_lr_rewinding_and_finetune_keep_trained_weights(tmp_path):
    for mode, kwargs in (("lr", {"rewind_step": 4}), ("none", {})):
        out = tmp_path / mode
        recorder = StartRecorder()
        cfg = SparsityConfig(method="imp", levels=1, rewind=mode, **kwargs)
        trainer = make_trainer(out, cfg, [recorder], lr_scheduler_type="cosine")
        trainer.train()
        mask = level_masks(out, 1)[1]
        final0 = load_file(os.path.join(out, "level_00", "model.safetensors"))
        start = recorder.starts[1]
        for name, m in mask.items():
            assert torch.equal(start["weights"][name][m], final0[name][m])
            assert torch.count_nonzero(start["weights"][name][~m]) == 0
        if mode == "lr":
            assert start["step"] == 4
        else:
            assert start["step"] == 0
            last_lr = metrics_of(out, 0)["last_learning_rate"]
            assert start["lr"] == pytest.approx(last_lr)


def test_controls_reuse_trunk_masks_or_counts(tmp_path):
    trunk = tmp_path / "trunk"
    cfg = SparsityConfig(method="imp", levels=2, rewind="init")
    trainer = make_trainer(trunk, cfg)
    trainer.train()
    recorder = StartRecorder()
    trainer.add_callback(recorder)
    run_controls(trainer, "reinit")
    run_controls(trainer, "random_prune", levels=[2])
    reinit_dir, random_dir = str(trunk) + ".reinit", str(trunk) + ".random_prune"
    assert os.path.isdir(reinit_dir) and os.path.isdir(random_dir)
    theta0 = load_file(os.path.join(trunk, "init_weights.safetensors"))
    for level in (1, 2):
        trunk_masks = MaskSet.load(os.path.join(trunk, f"level_{level:02d}"))
        reinit_masks = MaskSet.load(os.path.join(reinit_dir, f"level_{level:02d}"))
        assert reinit_masks == trunk_masks
        meta = json.load(open(os.path.join(reinit_dir, f"level_{level:02d}", "metrics.json")))
        assert meta["trunk_level"] == level and meta["trunk_config_hash"] == cfg.hashname()
        start = recorder.starts[level - 1]["weights"]
        name = next(iter(trunk_masks))
        alive = trunk_masks[name]
        assert not torch.equal(start[name][alive], theta0[name][alive])  # a fresh initialisation
    trunk2 = MaskSet.load(os.path.join(trunk, "level_02"))
    random2 = MaskSet.load(os.path.join(random_dir, "level_02"))
    assert random2 != trunk2
    for name in trunk2:
        assert int(random2[name].sum()) == int(trunk2[name].sum())  # same per-layer counts
    start = recorder.starts[2]["weights"]  # random pruning rewinds like the trunk: survivors are theta_0
    for name, m in random2.items():
        assert torch.equal(start[name][m], theta0[name][m])
    assert not os.path.isdir(os.path.join(random_dir, "level_01"))  # level by level
    report = json.load(open(os.path.join(trunk, "imp_report.json")))
    assert set(report["controls"]) == {"reinit", "random_prune"}
    assert set(report["rewind_vs_reinit_gap"]) == {"1", "2"}


def test_resume_after_crash_gives_same_masks(tmp_path):
    cfg = SparsityConfig(method="imp", levels=2, rewind="step", rewind_step=4)
    reference = tmp_path / "reference"
    make_trainer(reference, cfg, save_strategy="steps", save_steps=5).train()

    crashed = tmp_path / "crashed"
    trainer = make_trainer(crashed, cfg, [Crash("level_01", 12)], save_strategy="steps", save_steps=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    # atomic outputs: level 0 is complete, level 1 exists only as a partial folder
    assert os.path.isfile(os.path.join(crashed, "level_00", "metrics.json"))
    assert not os.path.exists(os.path.join(crashed, "level_01"))
    assert os.path.isdir(os.path.join(crashed, "level_01.partial", "checkpoint-10"))

    make_trainer(crashed, cfg, save_strategy="steps", save_steps=5).train(resume_from_checkpoint=True)
    assert level_masks(crashed, 2) == level_masks(reference, 2)
    assert metrics_of(crashed, 2)["steps"] == 20


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prune_fraction": 0.0, "levels": 2}, "prune_fraction"),
        ({"prune_fraction": 1.0, "levels": 2}, "prune_fraction"),
        ({"prune_fraction": 1.5, "levels": 2}, "prune_fraction"),
        ({"levels": 2, "sparsity": 0.9}, "levels"),
        ({}, "levels"),
        ({"levels": 2, "rewind": "step"}, "rewind_step"),
        ({"levels": 2, "rewind": "init", "rewind_step": 3}, "rewind_step"),
        ({"levels": 2, "rewind": "sideways"}, "rewind"),
        ({"levels": 0}, "levels"),
    ],
)
def test_bad_imp_configs_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparsityConfig(method="imp", **kwargs)


def test_sparsity_target_implies_levels():
    cfg = SparsityConfig(method="imp", sparsity=0.9, prune_fraction=0.2)
    assert cfg.num_levels() == 11  # 0.8**11 = 0.086 <= 0.1 < 0.8**10
    assert SparsityConfig(method="imp", levels=11, sparsity=0.9).num_levels() == 11


def test_rewind_step_past_end_fails_before_training(tmp_path):
    trainer = make_trainer(tmp_path, SparsityConfig(method="imp", levels=1, rewind="step", rewind_step=20))
    with pytest.raises(ValueError, match="rewind_step"):
        trainer.train()
    assert not any(name.startswith("level_") for name in os.listdir(tmp_path)) if os.path.isdir(tmp_path) else True
