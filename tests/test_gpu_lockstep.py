"""CUDA-only: the batched engine's CUDA-graph replay trains exactly what its eager steps train.

Deselected by default; on a GPU machine: `python -m pytest tests/test_gpu_lockstep.py -m gpu -q -p no:cacheprovider`.
"""

from __future__ import annotations

import pytest
import torch

from hf_tickets.allocation import random_masks_like
from hf_tickets.lottery.lockstep import ArmStart, SplitTensors, TrainPlan, batch_tables, train_lockstep
from hf_tickets.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS, K_REWIND, BATCH = 60, 10, 32


def _setup(optimizer: str):
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 1, 8, 8, generator=g), torch.randint(0, 10, (512,), generator=g)
    train = SplitTensors(x.to(device), y.to(device))
    evals = {"validation": SplitTensors(x[:128].to(device), y[:128].to(device))}
    torch.manual_seed(0)
    template = build_model("lenet_300_100", hidden_sizes=[32, 16], image_size=8, num_channels=1, num_labels=10)
    plan = TrainPlan(
        total_steps=STEPS,
        batch_size=BATCH,
        lrs=[0.05 * (1 - s / STEPS) for s in range(STEPS)],  # a changing LR: the graph must read it per step
        optimizer=optimizer,
        momentum=0.9 if optimizer == "sgd" else 0.0,
        max_grad_norm=1.0,
        eval_steps=20,
    )
    weights = {n: t.clone() for n, t in template.state_dict().items()}
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in template.named_parameters() if n.endswith("weight")}
    return device, train, evals, template, plan, weights, masks


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_graph_replay_equals_eager(optimizer):
    device, train, evals, template, plan, weights, masks = _setup(optimizer)
    tables = batch_tables(plan, len(train.y), replicates=2, device=device)
    other = random_masks_like(masks, seed=1)
    # Two replicates (per-arm batches), a late joiner with optimizer state: every path of the step.
    first = train_lockstep(
        template, [ArmStart(weights, masks)], plan, train, evals, tables, snapshot_step=K_REWIND, use_cuda_graph=False
    )[0]
    state = {k: v for k, v in first.snapshot.items() if not k.startswith("weights/")}
    rewound = dict(weights, **{k[len("weights/") :]: v for k, v in first.snapshot.items() if k.startswith("weights/")})
    arms = [
        ArmStart(weights, other, 0, None, 1),
        ArmStart(rewound, masks, K_REWIND, state, 0),
    ]
    eager = train_lockstep(template, arms, plan, train, evals, tables, use_cuda_graph=False)
    graphed = train_lockstep(template, arms, plan, train, evals, tables, use_cuda_graph=True)
    for e, g in zip(eager, graphed):
        for name in e.weights:
            torch.testing.assert_close(g.weights[name], e.weights[name], rtol=1e-5, atol=1e-6)
        assert [row["step"] for row in g.history] == [row["step"] for row in e.history]
        assert g.train_loss == pytest.approx(e.train_loss, rel=1e-5)
    # The rewound arm continues the first run exactly: same weights as training straight through.
    for name in first.weights:
        torch.testing.assert_close(graphed[1].weights[name], first.weights[name], rtol=1e-5, atol=1e-6)
    for name, mask in masks.items():
        assert not graphed[1].weights[name][~mask].any()
