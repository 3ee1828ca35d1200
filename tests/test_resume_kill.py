"""Resumable, tested the way users break it: the training process is killed (SIGKILL) at a random moment, then
restarted from its last complete checkpoint; the result must equal an uninterrupted run's (weights, masks, method
state through the masks it drew, logs). Run for the toy method (every hook, JSON state) and, with `-m slow`, for
RigL and SET (generator and ever-active history in `sparsity_state.safetensors`, churn metrics in the logs)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_cnn
from resume_worker import CONFIGS
from safetensors.torch import load_file

from hf_tickets import apply_sparsity, load_masks

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_worker.py")
STEPS = 24


def _run(out, env, method, kill_after=None):
    proc = subprocess.Popen(
        [sys.executable, WORKER, str(out), str(STEPS), method],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        return True
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # wait for training to start, then a random moment
        if any(n.startswith("checkpoint-") for n in os.listdir(out)) if os.path.isdir(out) else False:
            time.sleep(kill_after)
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _strip(history):
    summary = ("runtime", "per_second", "train_loss", "total_flos")
    return [{k: v for k, v in e.items() if not any(s in k for s in summary)} for e in history]


@pytest.mark.parametrize(
    "method, seed",
    [
        ("toy", 0),
        ("toy", 1),
        # ~50 s each (three processes): the fast in-process RigL resume test is tests/test_rigl.py
        pytest.param("rigl", 0, marks=pytest.mark.slow),
        pytest.param("rigl", 1, marks=pytest.mark.slow),
        pytest.param("set", 0, marks=pytest.mark.slow),
    ],
)
def test_killed_at_a_random_moment_then_resumed_equals_uninterrupted(tmp_path, method, seed):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    )
    _run(tmp_path / "full", env, method)
    cut = tmp_path / "cut"
    killed = _run(cut, env, method, kill_after=random.Random(seed).uniform(0.0, 1.5))
    _run(cut, env, method)  # restart: resumes from the last complete checkpoint
    full, resumed = tmp_path / "full" / "final", cut / "final"
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_masks(str(full)) == load_masks(str(resumed))
    assert load_masks(str(full)).sparsity() > 0
    history = [json.loads((d / "log_history.json").read_text()) for d in (full, resumed)]
    assert _strip(history[0]) == _strip(history[1])
    if method != "toy":
        # The generator (RigL: tie-break noise; SET: the growth itself) and the ever-active history continued from
        # the checkpoint: the final state equals the uninterrupted run's.
        a, b = (load_file(d / "sparsity_state.safetensors") for d in (full, resumed))
        assert a.keys() == b.keys() and "generator" in a
        assert all(torch.equal(a[k], b[k]) for k in a)
        initial = apply_sparsity(make_cnn(), CONFIGS[method]())
        final = load_masks(str(full))
        assert initial != final, "the masks changed during training"
        assert all(int(initial[n].sum()) == int(final[n].sum()) for n in initial)
        churn = [e["dst/churn"] for e in history[0] if "dst/churn" in e]
        assert len(churn) == 8 and all(c > 0 for c in churn)  # ΔT=2 until T_end = 0.75 * 24
    print(f"killed mid-run: {killed}")
