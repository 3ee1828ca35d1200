"""Crash safety of a whole lottery run: kill the `hf-tickets run` process at chosen phases and random moments,
restart it with the plain CLI, and compare every level folder with an uninterrupted run (slow: `pytest -m slow`).

The run: the quickstart recipe shrunk (IMP, late rewinding to step 2, 2 pruned levels, both controls, checkpoints
every 4 of 12 steps), on each backend. A kill is `os._exit(137)` at the n-th call of a phase (inside a Trainer
checkpoint, between `checkpoint-k` and the rewind point, while publishing a level, ...) or SIGKILL at a random
time. Each run forks from this process (the imports are warm), so a kill costs about a second, not an import.
Prints the table `docs/results/crash_safety.md` quotes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart_digits.yaml")
SHRINK = [
    "training.max_steps=12",
    "training.eval_steps=4",
    "training.logging_steps=4",
    "training.save_strategy=steps",
    "training.save_steps=4",
    "sparsity.levels=2",
    "sparsity.rewind_step=2",
    "model.hidden_sizes=[16]",
    "data.max_eval_samples=60",
]
KILLED = 137


def _argv(out: Path, backend: str) -> list[str]:
    return ["run", QUICKSTART, f"training.output_dir={out}", f"backend={backend}", *SHRINK]


def _kill_at(target, name: str, n: int, when=None, after: bool = False):
    """Replace `target.name` by a wrapper that exits the process at its n-th call (matching `when`)."""
    original = getattr(target, name)
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == n and not after:
                os._exit(KILLED)
            result = original(*args, **kwargs)
            if calls["count"] == n:
                os._exit(KILLED)
            return result
        return original(*args, **kwargs)

    setattr(target, name, wrapper)


def _install(phase: str, n: int) -> None:
    """Fault points, by phase name (in the forked child only)."""
    from transformers.trainer_callback import TrainerState

    from hf_tickets import trainer as trainer_module
    from hf_tickets.lottery import layout, lockstep_backend, report, rewind, runner, ticket, trainer_backend

    replace_into = lambda suffix: lambda src, dst, *a, **k: str(dst).endswith(suffix)  # noqa: E731
    if phase == "checkpoint_weights":  # Trainer._save_checkpoint: weights written, state not yet
        _kill_at(trainer_module.TicketTrainer, "_save", n, after=True)
    elif phase == "checkpoint_state":  # the torn checkpoint: killed before trainer_state.json
        _kill_at(TrainerState, "save_to_json", n)
    elif phase == "rewind_copy":  # checkpoint-k copied, not yet renamed to rewind_point/
        _kill_at(rewind.os, "replace", n, when=replace_into("rewind_point"))
    elif phase == "rewind_write":  # lockstep: the rewind point written into its .tmp folder, not yet renamed
        _kill_at(rewind.os, "replace", n, when=replace_into("rewind_point"))
    elif phase == "level_start":
        _kill_at(trainer_backend, "write_json_atomic", n, after=True)
    elif phase == "publish_metrics":  # metrics.json written into level_NN.partial, not yet renamed
        _kill_at(layout, "finish_publish", n)
    elif phase == "publish_rename":  # checkpoints dropped, rename pending
        _kill_at(layout.os, "replace", n, when=lambda src, dst, *a, **k: str(src).endswith(".partial"))
    elif phase == "lockstep_write":  # lockstep: a level's files being written
        _kill_at(lockstep_backend, "write_model_card", n)
    elif phase == "init":
        _kill_at(runner, "fresh_init_weights", n, after=True)
    elif phase == "report":
        _kill_at(report, "write_report", n)
    elif phase == "ticket":
        _kill_at(ticket, "upsert_card_section", n)
    else:
        raise ValueError(phase)


def _fork_run(argv: list[str], phase: str | None = None, n: int = 0, kill_after: float | None = None) -> int:
    """Run the CLI in a forked child; returns its exit code (KILLED when a fault point or SIGKILL hit)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            torch.set_num_threads(1)
            if phase is not None:
                _install(phase, n)
            from hf_tickets.cli import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 (a traceback means a stuck run; the parent sees the code)
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return KILLED if code == -signal.SIGKILL else code


def _level_folders(out: Path) -> list[Path]:
    roots = [out, Path(f"{out}.reinit"), Path(f"{out}.random_prune")]
    return sorted(p for root in roots if root.is_dir() for p in root.iterdir() if p.name.startswith("level_"))


def _differences(out: Path, ref: Path) -> list[str]:
    """What differs between a restarted run and the uninterrupted one: folders, masks, weights, metrics."""
    mine = {str(p).replace(str(out), ""): p for p in _level_folders(out)}
    theirs = {str(p).replace(str(ref), ""): p for p in _level_folders(ref)}
    if set(mine) != set(theirs):
        return [f"folders {sorted(set(mine) ^ set(theirs))}"]
    diffs = []
    for key, folder in mine.items():
        other = theirs[key]
        for name in ("masks.safetensors", "model.safetensors"):
            a, b = load_file(folder / name), load_file(other / name)
            if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
                diffs.append(f"{key}/{name}")
        ma = json.loads((folder / "metrics.json").read_text())
        mb = json.loads((other / "metrics.json").read_text())
        for m in (ma, mb):
            m.pop("produced_by", None)
            for k in ("trunk_dir", "trunk_masks"):
                m.pop(k, None)
        if ma != mb:
            diffs.append(f"{key}/metrics.json: {sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}")
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith("checkpoint-") or p.suffix == ".bin"]
        if leftovers:
            diffs.append(f"{key}: {leftovers}")
    if not (out / "ticket" / "README.md").is_file():
        diffs.append("no ticket")
    return diffs


PHASES = {
    "trainer": [
        ("checkpoint_weights", 1),
        ("checkpoint_weights", 3),
        ("checkpoint_weights", 7),
        ("checkpoint_state", 1),
        ("checkpoint_state", 2),
        ("checkpoint_state", 5),
        ("checkpoint_state", 9),
        ("rewind_copy", 1),
        ("level_start", 1),
        ("level_start", 3),
        ("publish_metrics", 1),
        ("publish_metrics", 2),
        ("publish_metrics", 4),
        ("publish_rename", 1),
        ("publish_rename", 3),
        ("publish_rename", 6),
        ("init", 1),
        ("report", 1),
        ("ticket", 1),
    ],
    "lockstep": [
        ("rewind_write", 1),
        ("rewind_write", 2),
        ("lockstep_write", 1),
        ("lockstep_write", 2),
        ("lockstep_write", 4),
        ("publish_metrics", 1),
        ("publish_metrics", 3),
        ("publish_rename", 1),
        ("publish_rename", 4),
        ("init", 1),
        ("report", 1),
        ("ticket", 1),
    ],
}
RANDOM_KILLS = {"trainer": 8, "lockstep": 9}


@pytest.mark.parametrize("backend", ["trainer", "lockstep"])
def test_killed_runs_restart_to_the_uninterrupted_result(tmp_path, backend):
    ref = tmp_path / "ref"
    started = time.monotonic()
    assert _fork_run(_argv(ref, backend)) == 0
    duration = time.monotonic() - started
    rng = random.Random(0)
    kills = [(phase, n, None) for phase, n in PHASES[backend]]
    kills += [(None, 0, rng.uniform(0.05, 1.0) * duration) for _ in range(RANDOM_KILLS[backend])]
    stuck, different, not_hit = [], [], []
    for i, (phase, n, delay) in enumerate(kills):
        out = tmp_path / f"kill_{i}"
        code = _fork_run(_argv(out, backend), phase, n, kill_after=delay)
        label = phase and f"{phase}#{n}" or f"random@{delay:.2f}s"
        if code != KILLED:
            not_hit.append(label)  # the run ended before the fault point: still checked below
        restarts = 0
        while code != 0 and restarts < 2:
            code = _fork_run(_argv(out, backend))  # the plain CLI, as a user restarts it
            restarts += 1
        if code != 0:
            stuck.append(label)
            continue
        diffs = _differences(out, ref)
        if diffs:
            different.append((label, diffs[:3]))
    hit = len(kills) - len(not_hit)
    print(
        f"\n{backend}: {len(kills)} kill points ({hit} hit, {len(not_hit)} ended first: {not_hit}), "
        f"{len(stuck)} stuck {stuck}, {len(different)} different {different}; uninterrupted run {duration:.1f} s"
    )
    assert hit >= 15, f"only {hit} kills landed: {not_hit}"
    assert not stuck and not different
