"""BatchedMaskedTraining: K masked networks trained together equal K networks trained one at a time.

The reference for every comparison is the plain loop `TicketTrainer` enforces for one network: forward, backward,
`MaskSet.mask_grads_`, `torch.optim` step, `MaskSet.apply_`. CPU, float32, a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cnn

from hf_tickets import MaskSet
from hf_tickets.allocation import random_masks_like
from hf_tickets.enforce import MaskEnforcer, apply_masks_, count_violations
from hf_tickets.lottery.batched import BatchedMaskedTraining, cross_entropy
from hf_tickets.models import build_model

K = 3
STEPS = 20
BATCH = 16
RTOL, ATOL = 1e-5, 1e-6
SMALL_MLP = {"hidden_sizes": [32, 16], "image_size": 8}  # LeNet-300-100's architecture, narrower and on 8x8 images
LENET5 = {"image_size": 16}


def _models(name: str, config: dict, seeds: list[int]) -> list[torch.nn.Module]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(build_model(name, **config))
    return out


def _masks(model: torch.nn.Module, density: float, seed: int) -> MaskSet:
    """Random masks on every weight matrix/kernel (biases dense), `density` of the entries kept."""
    g = torch.Generator().manual_seed(seed)
    return MaskSet(
        {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if n.endswith("weight")}
    )


def _data(config: dict, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    side = config["image_size"]
    return torch.randn(n, 1, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def _batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        yield x[idx], y[idx]


def _torch_optimizer(kind: str, params, hp: dict) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"], weight_decay=hp["weight_decay"]
        )
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return cls(params, lr=hp["lr"], weight_decay=hp["weight_decay"])


def _train_alone(model, masks, kind, hp, batches, check_zero=True) -> dict[str, torch.Tensor]:
    """The reference: one network, torch.optim, MaskSet enforcement (mask grads before the step, weights after)."""
    if masks is not None:
        apply_masks_(model, masks)
    opt = _torch_optimizer(kind, model.parameters(), hp)
    for x, y in batches:
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        if masks is not None:
            MaskEnforcer(masks, model).mask_grads_()
        opt.step()
        if masks is not None:
            apply_masks_(model, masks)
            if check_zero:
                assert count_violations(model, masks) == 0
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(batched: BatchedMaskedTraining, references: list[dict[str, torch.Tensor]]) -> None:
    for i, reference in enumerate(references):
        got = batched.state_dict(i)
        assert set(got) == set(reference)
        for name, want in reference.items():
            where = f"arm {i} {name}"
            torch.testing.assert_close(got[name], want, rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")


SGD = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-3}
CASES = {
    "sgd": ("sgd", SGD),
    "sgd_plain": ("sgd", {**SGD, "momentum": 0.0, "weight_decay": 0.0}),
    "sgd_nesterov": ("sgd", {**SGD, "nesterov": True}),
    "adam": ("adam", {"lr": 1.2e-3, "weight_decay": 1e-4}),
    "adamw": ("adamw", {"lr": 1e-3, "weight_decay": 0.1}),
}


@pytest.mark.parametrize(
    "arch, case", [("lenet_300_100", case) for case in CASES] + [("lenet5", "sgd"), ("lenet5", "adam")]
)
def test_same_weights_as_training_each_network_alone(arch, case):
    kind, hp = CASES[case]
    config = SMALL_MLP if arch == "lenet_300_100" else LENET5
    seeds = [0, 0, 1]  # arms 0 and 1 share theta_0 (trunk + random-pruning control), arm 2 is a fresh init
    x, y = _data(config, 256)
    models = _models(arch, config, seeds)
    masks = [_masks(models[0], 0.3, seed=10), _masks(models[0], 0.3, seed=11), _masks(models[0], 0.6, seed=12)]
    nesterov = {"nesterov": hp["nesterov"], "momentum": hp["momentum"]} if kind == "sgd" else {}
    batched = BatchedMaskedTraining(
        models, masks, optimizer=kind, lr=hp["lr"], weight_decay=hp["weight_decay"], **nesterov
    )
    for step, (xb, yb) in enumerate(_batches(x, y, STEPS, seed=5)):
        losses = batched.step(xb, yb)
        assert losses.shape == (K,) and torch.isfinite(losses).all()
        assert batched.count_violations() == [0] * K, f"masked weights moved off zero at step {step}"

    references = [
        _train_alone(model, mask, kind, hp, _batches(x, y, STEPS, seed=5))
        for model, mask in zip(_models(arch, config, seeds), masks)
    ]
    _assert_same_weights(batched, references)


def test_each_arm_keeps_its_own_masks_and_a_dense_arm_stays_dense():
    models = _models("lenet_300_100", SMALL_MLP, [0, 1, 2])
    ref = models[0]
    trunk = _masks(ref, 0.2, seed=3)
    random_prune = MaskSet(random_masks_like(trunk, seed=4))
    batched = BatchedMaskedTraining(models, [trunk, random_prune, None], optimizer="sgd", lr=0.1, momentum=0.9)
    x, y = _data(SMALL_MLP, 128)
    for xb, yb in _batches(x, y, 10, seed=0):
        batched.step(xb, yb)
    assert batched.count_violations() == [0, 0, 0]
    for name in trunk:
        w = batched.params[name]
        assert torch.all(w[0][~trunk[name]] == 0) and torch.all(w[1][~random_prune[name]] == 0)
        # the other arm's pruned positions are trained where this arm keeps them
        assert torch.all(w[0][trunk[name] & ~random_prune[name]] != 0)
        assert torch.all(w[1][random_prune[name] & ~trunk[name]] != 0)
        assert torch.count_nonzero(w[2]) == w[2].numel(), "the dense arm must have no zeros forced on it"
        assert torch.equal(batched.masks[name][0], trunk[name]) and batched.masks[name][2].all()
    density = batched.density()
    assert density[0] == pytest.approx(trunk.density()) and density[1] == pytest.approx(trunk.density())
    assert density[2] == 1.0


def test_per_arm_batches_match_training_alone_on_those_batches():
    kind, hp = CASES["sgd"]
    models = _models("lenet_300_100", SMALL_MLP, [0, 1, 2])
    masks = [_masks(models[0], 0.4, seed=s) for s in (20, 21, 22)]
    batched = BatchedMaskedTraining(models, masks, optimizer=kind, **{k: v for k, v in hp.items()})
    x, y = _data(SMALL_MLP, 256)
    streams = [list(_batches(x, y, STEPS, seed=100 + i)) for i in range(K)]  # replicates: own data order each
    for step in range(STEPS):
        xs = torch.stack([streams[i][step][0] for i in range(K)])
        ys = torch.stack([streams[i][step][1] for i in range(K)])
        batched.step(xs, ys, per_arm=True)
    references = [
        _train_alone(model, mask, kind, hp, streams[i])
        for i, (model, mask) in enumerate(zip(_models("lenet_300_100", SMALL_MLP, [0, 1, 2]), masks))
    ]
    _assert_same_weights(batched, references)


@pytest.mark.parametrize("arch", ["lenet_300_100", "lenet5"])
def test_evaluate_matches_each_model_evaluated_alone(arch):
    config = SMALL_MLP if arch == "lenet_300_100" else LENET5
    models = _models(arch, config, [0, 1, 2])
    masks = [_masks(models[0], 0.5, seed=s) for s in (1, 2, 3)]
    batched = BatchedMaskedTraining(models, masks, lr=0.05)
    x, y = _data(config, 300, seed=1)
    for xb, yb in _batches(x, y, 15, seed=2):
        batched.step(xb, yb)
    accuracies = batched.evaluate(x, y, batch_size=64)  # 300 = 4 full chunks + a short one
    logits = batched.logits(x)
    assert logits.shape == (K, 300, 10)
    for i in range(K):
        model = build_model(arch, **config)
        model.load_state_dict(batched.state_dict(i))
        model.eval()
        with torch.no_grad():
            alone = model(x).logits
        torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)
        assert accuracies[i] == pytest.approx((alone.argmax(-1) == y).double().mean().item())
        assert count_violations(model, masks[i]) == 0


def test_unstack_gives_loadable_state_dicts_and_models_are_not_changed():
    models = _models("lenet_300_100", SMALL_MLP, [0, 1])
    before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    batched = BatchedMaskedTraining(models, [_masks(models[0], 0.5, seed=0), None], lr=0.1)
    x, y = _data(SMALL_MLP, 64)
    batched.step(x[:BATCH], y[:BATCH])
    for model, saved in zip(models, before):  # the inputs are copied, never trained in place
        for n, p in model.named_parameters():
            assert torch.equal(p, saved[n])
    states = batched.unstack()
    assert len(states) == 2 and set(states[0]) == set(models[0].state_dict())
    fresh = build_model("lenet_300_100", **SMALL_MLP)
    fresh.load_state_dict(states[1])
    assert torch.equal(fresh.classifier.weight, batched.params["classifier.weight"][1])


def test_factory_lr_tensor_and_custom_loss():
    seen = []

    def factory(i: int) -> torch.nn.Module:
        seen.append(i)
        torch.manual_seed(i)
        return build_model("lenet_300_100", **SMALL_MLP)

    batched = BatchedMaskedTraining(factory, [None, None], lr=0.1, loss_fn=cross_entropy)
    assert seen == [0, 1] and batched.num_models == 2
    x, y = _data(SMALL_MLP, 32)
    logits = torch.randn(5, 10)
    labels = torch.randint(0, 10, (5,))
    torch.testing.assert_close(cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    batched.set_lr(0.0)
    frozen = batched.state_dict(0)
    batched.step(x[:BATCH], y[:BATCH])
    for n, p in batched.state_dict(0).items():
        assert torch.equal(p, frozen[n]), "lr 0 must not move the weights"
    assert float(batched.lr) == 0.0


def test_errors_name_the_problem():
    models = _models("lenet_300_100", SMALL_MLP, [0, 1])
    cumulative = [make_cnn(0), make_cnn(1)]  # BatchNorm trains in lockstep, except a cumulative average
    for model in cumulative:
        model.norm.momentum = None
    with pytest.raises(NotImplementedError, match="BatchNorm2d with momentum=None"):
        BatchedMaskedTraining(cumulative, [None, None])
    with pytest.raises(ValueError, match="one architecture"):
        BatchedMaskedTraining(
            [models[0], build_model("lenet_300_100", hidden_sizes=[16, 16], image_size=8)], [None] * 2
        )
    with pytest.raises(ValueError, match="one mask set per model"):
        BatchedMaskedTraining(models, [None])
    with pytest.raises(ValueError, match="not a parameter"):
        BatchedMaskedTraining(models, [{"nope.weight": torch.ones(2)}, None])
    with pytest.raises(ValueError, match="shape"):
        BatchedMaskedTraining(models, [{"classifier.weight": torch.ones(3, 3, dtype=torch.bool)}, None])
    with pytest.raises(ValueError, match="optimizer"):
        BatchedMaskedTraining(models, [None, None], optimizer="lion")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_host_sync_and_can_be_graph_captured():
    models = _models("lenet_300_100", SMALL_MLP, [0, 1, 2])
    masks = [_masks(models[0], 0.3, seed=s) for s in (1, 2, 3)]
    batched = BatchedMaskedTraining(models, masks, optimizer="adam", lr=1e-3, device="cuda")
    x, y = (t.cuda() for t in _data(SMALL_MLP, 256))
    static_x, static_y = x[:BATCH].clone(), y[:BATCH].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        batched.step(static_x, static_y)  # warm-up outside the graph (lazy init, autograd's stream set-up)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batched.step(static_x, static_y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batched.step(static_x, static_y)
    replayed = BatchedMaskedTraining(
        _models("lenet_300_100", SMALL_MLP, [0, 1, 2]), masks, optimizer="adam", lr=1e-3, device="cuda"
    )
    # The eager twin takes the same steps: 2 before capture, 1 inside it (capture runs no kernels), then replays.
    for _ in range(2):
        replayed.step(static_x, static_y)
    for xb, yb in _batches(x.cpu(), y.cpu(), 5, seed=0):
        static_x.copy_(xb)
        static_y.copy_(yb)
        graph.replay()
        replayed.step(static_x, static_y)
    torch.cuda.synchronize()
    assert batched.count_violations() == [0, 0, 0]
    for i in range(K):
        for name, p in replayed.state_dict(i).items():
            torch.testing.assert_close(batched.state_dict(i)[name], p, rtol=1e-4, atol=1e-5)
