"""Crash safety of a lottery level on the Trainer backend, in-process (the kill test is tests/test_kill_lottery.py):
a crash after a level's last checkpoint, a crash inside publishing, a torn rewind point, and a failed trainer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.lottery import layout, run_experiment, trainer_backend
from hf_tickets.recipes import build_trainer, load_recipe

QUICKSTART = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart_digits.yaml")
SHRINK = [
    "training.max_steps=12",
    "training.eval_steps=4",
    "training.logging_steps=4",
    "training.save_strategy=steps",
    "training.save_steps=4",
    "sparsity.levels=1",
    "sparsity.rewind_step=2",
    "model.hidden_sizes=[16]",
    "data.max_eval_samples=60",
    "controls=[]",
]


class Crash(Exception):
    pass


def _run(out):
    return run_experiment(build_trainer(load_recipe(QUICKSTART, [f"training.output_dir={out}", *SHRINK])))


def _same_levels(out, ref) -> None:
    for level in ("level_00", "level_01"):
        a, b = (
            json.loads((out / level / "metrics.json").read_text()),
            json.loads((ref / level / "metrics.json").read_text()),
        )
        a.pop("produced_by"), b.pop("produced_by")  # the command line (the CLI here, pytest for the reference)
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        wa, wb = load_file(out / level / "model.safetensors"), load_file(ref / level / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), level
        names = set(os.listdir(out / level))
        assert "training_args.json" in names and not [n for n in names if n.endswith(".bin") or "checkpoint" in n]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    _run(ref)
    return ref


def test_crash_after_the_last_checkpoint_finishes_without_an_extra_step(tmp_path, reference, monkeypatch):
    """Trainer resumed from checkpoint-12 of 12 trains a 13th step; the level must end as it was, with all of its
    evaluations (not only those after the resume) and its whole mean train loss."""

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(trainer_backend, "publish_level", crash)
    with pytest.raises(Crash):
        _run(tmp_path / "run")
    assert (tmp_path / "run" / "level_00.partial" / "checkpoint-12").is_dir()
    monkeypatch.undo()
    summary = _run(tmp_path / "run")
    assert summary.trained == ["trunk[0] level 0", "trunk[0] level 1"]
    assert json.loads((tmp_path / "run" / "level_00" / "metrics.json").read_text())["steps"] == 12
    _same_levels(tmp_path / "run", reference)


def test_crash_mid_level_resumes_with_the_whole_history(tmp_path, reference, monkeypatch):
    from hf_tickets.trainer import TicketTrainer as Trainer

    real, calls = Trainer._save, {"n": 0}

    def crash_on_third_save(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # level 0: checkpoints at 2 (rewind point), 4, 8; the fourth save is checkpoint-12
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash_on_third_save)
    with pytest.raises(Crash):
        _run(tmp_path / "run")
    monkeypatch.undo()
    _run(tmp_path / "run")
    _same_levels(tmp_path / "run", reference)


def test_interrupted_publish_is_finished_not_retrained(tmp_path, reference, monkeypatch):
    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(layout, "finish_publish", crash)  # metrics.json is in level_00.partial, rename pending
    with pytest.raises(Crash):
        _run(tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / "level_00.partial" / "metrics.json").is_file()
    summary = _run(tmp_path / "run")
    assert summary.trained == ["trunk[0] level 1"] and summary.reused == ["trunk[0] level 0"]
    _same_levels(tmp_path / "run", reference)


def test_lost_rewind_point_is_recopied_from_checkpoint_k(tmp_path, reference, monkeypatch):
    from hf_tickets.lottery import rewind

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(rewind, "copy_checkpoint", crash)  # checkpoint-2 written, its copy never made
    with pytest.raises(Crash):
        _run(tmp_path / "run")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "rewind_point").exists()
    _run(tmp_path / "run")
    assert (tmp_path / "run" / "rewind_point" / "trainer_state.json").is_file()
    _same_levels(tmp_path / "run", reference)
    # and with checkpoint-2 gone too, level 0 trains again from the start instead of resuming past step 2
    shutil.rmtree(tmp_path / "run" / "rewind_point")
    shutil.rmtree(tmp_path / "run" / "level_01")
    os.replace(tmp_path / "run" / "level_00", tmp_path / "run" / "level_00.partial")
    os.remove(tmp_path / "run" / "level_00.partial" / "metrics.json")
    ckpt = tmp_path / "run" / "level_00.partial" / "checkpoint-8"
    shutil.copytree(reference / "level_00", ckpt)  # a complete-looking later checkpoint
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 8, "log_history": []}))
    _run(tmp_path / "run")
    _same_levels(tmp_path / "run", reference)


def test_a_failed_trainer_leaves_the_model_untouched(tmp_path):
    from conftest import training_args

    from hf_tickets.models import build_model

    model = build_model("lenet_300_100", hidden_sizes=[16], image_size=8, num_channels=1, num_labels=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (
        SparsityConfig(method="magnitude", sparsity=0.5, target_modules=["no_such_layer"]),
        SparsityConfig(method="magnitude", sparsity=0.5, layer_rates={"no_such_layer": 0.5}),
    ):
        with pytest.raises(ValueError):
            TicketTrainer(model=model, args=training_args(tmp_path), sparsity_config=config)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not hasattr(model, "hf_tickets_masks")


def test_recipes_cannot_turn_on_remote_code(tmp_path):
    from hf_tickets.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(Path(QUICKSTART).read_text() + "\n")
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_recipe(str(recipe), ["model.trust_remote_code=true"])
    recipe.write_text(Path(QUICKSTART).read_text().replace("model:\n", "model:\n  trust_remote_code: true\n", 1))
    with pytest.raises(ValueError, match="not accepted from a recipe"):
        load_recipe(str(recipe))
    assert main(["run", str(recipe)]) == 2


def test_offline_pickles_are_hash_checked(tmp_path):
    from hf_tickets.data import MNIST_PICKLE_SHA256, _verified

    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"something else")
    with pytest.raises(ValueError, match="not the file hf_tickets knows"):
        _verified(fake, MNIST_PICKLE_SHA256, "MNIST")


def test_every_single_bit_flip_in_a_masks_file_is_refused(tmp_path):
    """One bit flipped in each byte of a saved masks file (header, metadata, checksums, packed bits): every load
    fails with a ValueError; none returns other masks."""
    import random

    from hf_tickets import MaskSet

    g = torch.Generator().manual_seed(0)
    masks = MaskSet(
        {"a.weight": torch.rand(6, 10, generator=g) < 0.4, "b.weight": torch.rand(3, 6, generator=g) < 0.7},
        {"method": "imp", "level": 2},
    )
    path = masks.save(tmp_path / "good")
    data = Path(path).read_bytes()
    assert MaskSet.load(path) == masks
    rng = random.Random(0)
    accepted = []
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << rng.randrange(8)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(bytes(flipped))
        try:
            MaskSet.load(bad)
        except ValueError:
            continue
        accepted.append(i)
    assert not accepted, f"{len(accepted)} of {len(data)} flipped files loaded (bytes {accepted[:10]})"


@pytest.mark.parametrize("where", ["checkpoint", "rewind", "publish"])
def test_a_full_disk_mid_run_then_a_restart_gives_the_uninterrupted_result(tmp_path, reference, monkeypatch, where):
    """ENOSPC raised while a checkpoint, the rewind point or a level folder is written: the CLI says so in one line
    (exit 1), and once there is space again the same command ends with the uninterrupted run's levels."""
    import errno

    from hf_tickets.cli import main
    from hf_tickets.lottery import rewind
    from hf_tickets.trainer import TicketTrainer as Trainer

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        real, calls = Trainer._save, {"n": 0}

        def save(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                disk_full()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "_save", save)
    elif where == "rewind":
        monkeypatch.setattr(rewind.shutil, "copytree", disk_full)
    else:
        monkeypatch.setattr(layout, "write_json_atomic", disk_full)
    out = tmp_path / "run"
    argv = ["run", QUICKSTART, f"training.output_dir={out}", *SHRINK]
    assert main(argv) == 1
    monkeypatch.undo()
    assert main(argv) == 0
    _same_levels(out, reference)
