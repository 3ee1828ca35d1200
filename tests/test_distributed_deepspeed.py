"""DeepSpeed on two CPU processes (gloo), when deepspeed is installed: ZeRO-2 keeps the pruned entries of its fp32
master weights at zero (and without hf_tickets' master masking they leak: the negative control), ZeRO-3 is refused
before training. The refusal logic itself is tested without DeepSpeed in tests/test_distributed_methods.py."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(config: str, out, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(REPO, "recipes", "accelerate", f"{config}.yaml"), "--num_processes", "2",
        os.path.join(REPO, "tests", "deepspeed_worker.py"), "--mode", config, "--out", str(out),
        "--size", "tiny", "--steps", "8", "--warmup", "2", "--batch", "8", "--seq", "32", *extra,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


@pytest.mark.slow
def test_zero2_masks_the_fp32_master_weights(tmp_path):
    result = _launch("deepspeed_zero2", tmp_path / "on")
    assert result.returncode == 0, result.stderr[-3000:]
    masked = json.load(open(tmp_path / "on" / "deepspeed_zero2.json"))
    assert masked["world_size"] == 2 and masked["ticket"]["leaks"] == 0 and masked["ticket"]["master_leaks"] == 0
    control = _launch("deepspeed_zero2", tmp_path / "off", "--no-master-masking")
    assert control.returncode == 1  # the check fails: the master copy kept pruned values
    leaked = json.load(open(tmp_path / "off" / "deepspeed_zero2.json"))
    assert leaked["ticket"]["leaks"] == 0 and leaked["ticket"]["master_leaks"] > 0


@pytest.mark.slow
def test_zero3_is_refused_before_training(tmp_path):
    result = _launch("deepspeed_zero3", tmp_path, "--expect-refusal")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "deepspeed_zero3.json"))
    assert "ZeRO-3 is not supported" in report["refused"] and "ticket" not in report
