"""IMP with controls under torchrun, two CPU processes (gloo): the run completes and one rank writes."""

import json
import os
import subprocess
import sys

import pytest

from hf_tickets import MaskSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) under torchrun, offline; fails the test with the end of stderr if they fail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_imp_with_controls_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    result = _torchrun(
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
    )
    masks = [MaskSet.load(os.path.join(out, f"level_{level:02d}")) for level in range(3)]
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    assert MaskSet.load(os.path.join(f"{out}.reinit", "level_02")) == masks[2]
    report = json.load(open(os.path.join(out, "imp_report.json")))
    assert [row["level"] for row in report["trunk"]] == [0, 1, 2]
    assert result.stdout.count("IMP run in") == 1  # only the writing rank reports
    assert os.path.isfile(os.path.join(out, "ticket", "masks.safetensors"))


@pytest.mark.slow
def test_sr_ste_is_identical_on_two_gloo_ranks(tmp_path):
    """SR-STE recomputes masks from DDP-averaged dense weights: every rank must hold the same dense weights, masks
    and N:M projection after every step (issue 12)."""
    out = tmp_path / "ddp_sr_ste"
    _torchrun(os.path.join(REPO, "tests", "ddp_sr_ste_worker.py"), str(out), "6")
    ranks = [json.load(open(out / f"rank_{r}.json")) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["steps"]) == 6 and ranks[0]["steps"] == ranks[1]["steps"]
    assert all(s["holds"] for s in ranks[0]["steps"])
    assert len({s["masks"] for s in ranks[0]["steps"]}) > 1  # the masks moved during training


@pytest.mark.slow
def test_rigl_masks_are_bitwise_equal_on_two_gloo_ranks(tmp_path):
    """RigL grows from the DDP-averaged dense gradient with a generator seeded alike on every rank: each rank,
    reading different samples, must hold the same masks after every update and at the end (issue 11)."""
    import torch

    out = tmp_path / "ddp_rigl"
    _torchrun(os.path.join(REPO, "tests", "ddp_rigl_worker.py"), str(out), "12")
    ranks = [json.load(open(out / f"rank_{r}.json")) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # The ranks trained on different samples, so their local gradients differed before DDP averaged them.
    first_epoch = [set(r["samples_read"][:32]) for r in ranks]
    assert first_epoch[0].isdisjoint(first_epoch[1])
    # Masks bitwise equal at every optimizer step (fingerprints of the mask bytes), and the same weights at the end.
    steps = [[(s["step"], s["masks"]) for s in r["steps"]] for r in ranks]
    assert len(steps[0]) == 13 and steps[0] == steps[1]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["churn"] == ranks[1]["churn"] and len(ranks[0]["churn"]) == 4
    # Updates at ΔT=2 before T_end = 0.75 * 12: the masks changed at steps 2, 4, 6, 8 and nowhere else.
    prints = [fp for _, fp in steps[0]]
    assert [i for i in range(1, len(prints)) if prints[i] != prints[i - 1]] == [2, 4, 6, 8]
    assert all(s["active"] == ranks[0]["steps"][0]["active"] for s in ranks[0]["steps"]), "per-layer counts constant"
    final = [MaskSet.load(out / f"rank_{r}") for r in range(2)]
    assert final[0] == final[1]
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
