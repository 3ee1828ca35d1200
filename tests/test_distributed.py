"""IMP with controls under torchrun, two CPU processes (gloo): the run completes and one rank writes."""

import json
import os
import subprocess
import sys

import pytest

from hf_tickets import MaskSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_imp_with_controls_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_tickets.cli",
        "run",
        os.path.join(REPO, "recipes", "quickstart_digits.yaml"),
        f"training.output_dir={out}",
        "training.max_steps=40",
        "training.eval_steps=20",
        "sparsity.levels=2",
        "sparsity.rewind_step=10",
        "control_levels=[2]",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    masks = [MaskSet.load(os.path.join(out, f"level_{level:02d}")) for level in range(3)]
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    assert MaskSet.load(os.path.join(f"{out}.reinit", "level_02")) == masks[2]
    report = json.load(open(os.path.join(out, "imp_report.json")))
    assert [row["level"] for row in report["trunk"]] == [0, 1, 2]
    assert result.stdout.count("IMP run in") == 1  # only the writing rank reports
    assert os.path.isfile(os.path.join(out, "ticket", "masks.safetensors"))
