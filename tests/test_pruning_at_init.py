"""Pruning at initialization: SNIP, GraSP (the scores against hand computations / finite differences) and SynFlow
(against the analytic score of a linear network); exact sparsity and allocation; scoring leaves the model, its
gradients, modes, buffers and the global RNG as they were; iterative masks only shrink; end to end in
TicketTrainer without shifting the training data order; bad configs rejected."""

from __future__ import annotations

import pytest
import torch
from conftest import count_violations_of, make_bert, make_cnn, make_dataset, training_args
from torch import nn

from hf_tickets import SparsityConfig, TicketTrainer
from hf_tickets.methods import GraSPConfig, SNIPConfig, SynFlowConfig, get_method
from hf_tickets.methods import snip as snip_module
from hf_tickets.methods import synflow as synflow_module
from hf_tickets.methods.grasp import grasp_scores
from hf_tickets.methods.snip import snip_scores
from hf_tickets.methods.synflow import synflow_scores
from hf_tickets.targets import resolve_targets


def _cnn_batches(n_rows=16, batch_size=4):
    rows = list(make_dataset("cnn", n_rows))
    batches = [torch.utils.data.default_collate(rows[i : i + batch_size]) for i in range(0, n_rows, batch_size)]
    return lambda: iter(batches)


def _masks(method, model, batches=None, **config):
    cfg = SparsityConfig(method=method, **config)
    return get_method(method)(cfg).initial_masks(model, resolve_targets(model, cfg), batches)


# ---- a tiny HF-style regression model and its gradient by hand ----------------------------------------------------


class TinyRegression(nn.Module):
    """x -> Linear(3, 4) -> tanh -> Linear(4, 1); returns a dict with `loss` (mean squared error) and `logits`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    def forward(self, x, labels=None):
        pred = self.net(x).squeeze(-1)
        return {"loss": None if labels is None else ((pred - labels) ** 2).mean(), "logits": pred}


def _hand_grads(w1, b1, w2, b2, x, y):
    """∂L/∂W1, ∂L/∂W2 of L = mean((tanh(x W1ᵀ + b1) W2ᵀ + b2 - y)²), written out by hand."""
    h = torch.tanh(x @ w1.T + b1)
    pred = (h @ w2.T + b2).squeeze(-1)
    dpred = 2 * (pred - y) / len(y)
    dw2 = dpred[None, :] @ h
    dz = (dpred[:, None] * w2) * (1 - h**2)
    return dz.T @ x, dw2


def _regression_data(n_batches=2):
    g = torch.Generator().manual_seed(1)
    return [
        {"x": torch.randn(5, 3, generator=g, dtype=torch.float64), "labels": torch.randn(5, generator=g).double()}
        for _ in range(n_batches)
    ]


def _reg_targets(model):
    return {"net.0.weight": model.net[0].weight, "net.2.weight": model.net[2].weight}


def test_snip_scores_equal_the_hand_computation():
    model = TinyRegression()
    data = _regression_data(2)
    w1, b1, w2, b2 = (p.detach() for p in model.net.parameters())
    grads = [_hand_grads(w1, b1, w2, b2, d["x"], d["labels"]) for d in data]
    g1, g2 = grads[0][0] + grads[1][0], grads[0][1] + grads[1][1]
    scores = snip_scores(model, _reg_targets(model), data)
    torch.testing.assert_close(scores["net.0.weight"], (w1 * g1).abs().float())
    torch.testing.assert_close(scores["net.2.weight"], (w2 * g2).abs().float())


def test_grasp_scores_equal_finite_differences_of_the_hand_gradient():
    model = TinyRegression()
    data = _regression_data(2)
    w1, b1, w2, b2 = (p.detach() for p in model.net.parameters())

    def grad(a, c):
        parts = [_hand_grads(a, b1, c, b2, d["x"], d["labels"]) for d in data]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    g1, g2 = grad(w1, w2)
    eps = 1e-5  # Hg = (∇L(θ + εg) - ∇L(θ - εg)) / 2ε
    plus, minus = grad(w1 + eps * g1, w2 + eps * g2), grad(w1 - eps * g1, w2 - eps * g2)
    hg1, hg2 = (plus[0] - minus[0]) / (2 * eps), (plus[1] - minus[1]) / (2 * eps)
    scores = grasp_scores(model, _reg_targets(model), data)
    torch.testing.assert_close(scores["net.0.weight"], (-w1 * hg1).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores["net.2.weight"], (-w2 * hg2).float(), rtol=1e-5, atol=1e-7)
    assert scores["net.0.weight"].abs().sum() > 0


def test_grasp_prunes_the_largest_scores():
    model = TinyRegression()
    data = _regression_data(1)
    cfg = SparsityConfig(method="grasp", sparsity=0.5)
    masks = get_method("grasp")(cfg).initial_masks(model, _reg_targets(model), lambda: iter(data))
    scores = grasp_scores(model, _reg_targets(model), data)
    kept = torch.cat([scores[n][masks[n]] for n in masks])
    pruned = torch.cat([scores[n][~masks[n]] for n in masks])
    assert len(pruned) == 8 and kept.max() <= pruned.min()


def test_synflow_score_of_a_linear_network_is_analytic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False))
    w1, w2 = model[0].weight.detach().abs(), model[1].weight.detach().abs()
    scores = synflow_scores(model, ["0.weight", "1.weight"], (5,))
    # R = 1ᵀ|W2||W1|1: ∂R/∂W1[i, j] = Σ_k |W2|[k, i], ∂R/∂W2[k, i] = Σ_j |W1|[i, j]
    torch.testing.assert_close(scores["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(scores["1.weight"], w2 * w1.sum(1)[None, :])


# ---- masks: exact sparsity, allocation, not magnitude -------------------------------------------------------------


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_exact_sparsity_and_not_magnitude(method):
    model = make_cnn()
    extra = {"iterations": 10} if method == "synflow" else {}
    masks = _masks(method, model, _cnn_batches(), sparsity=0.9, **extra)
    numel = sum(m.numel() for m in masks.values())
    assert numel - sum(int(m.sum()) for m in masks.values()) == round(0.9 * numel)
    assert masks != _masks("magnitude", model, sparsity=0.9)
    assert masks.metadata["method"] == method


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_layerwise_scope_and_layer_rates_are_respected(method):
    model = make_cnn()
    extra = {"iterations": 3} if method == "synflow" else {}
    masks = _masks(method, model, _cnn_batches(), sparsity=0.8, scope="layerwise", **extra)
    for name, m in masks.items():
        assert m.numel() - int(m.sum()) == round(0.8 * m.numel()), name
    masks = _masks(method, model, _cnn_batches(), sparsity=0.8, layer_rates={"classifier": 0.5}, **extra)
    head = masks["classifier.weight"]
    assert head.numel() - int(head.sum()) == round(0.4 * head.numel())


@pytest.mark.parametrize("method", ["snip", "synflow"])
def test_iterative_masks_only_shrink_and_follow_the_exponential_schedule(method, monkeypatch):
    module = snip_module if method == "snip" else synflow_module
    seen = []
    original = module.masks_from_scores

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(module, "masks_from_scores", record)
    model = make_cnn()
    masks = _masks(method, model, _cnn_batches(), sparsity=0.9, iterations=4)
    assert len(seen) == 4
    numel = sum(m.numel() for m in masks.values())
    for k, (before, after) in enumerate(zip(seen, seen[1:]), start=2):
        assert all(bool((after[n] <= before[n]).all()) for n in before), "masks only shrink"
        kept = sum(int(m.sum()) for m in after.values())
        assert kept == numel - round((1 - 0.1 ** (k / 4)) * numel)
    assert masks.sparsity() == pytest.approx(0.9, abs=1e-3)


# ---- scoring leaves no trace --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, extra",
    [("snip", {"iterations": 3, "score_batches": 2}), ("grasp", {"score_batches": 2}), ("synflow", {"iterations": 5})],
)
def test_scoring_leaves_model_grads_modes_buffers_and_rng_unchanged(method, extra):
    model = make_cnn()
    model.train()
    model.classifier.eval()  # a mixed mode must come back as it was; BatchNorm trains (running stats move)
    torch.manual_seed(5)
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    grad_ids = {n: id(p.grad) for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.random.get_rng_state()
    masks = _masks(method, model, _cnn_batches(), sparsity=0.9, **extra)
    assert masks.sparsity() > 0.89
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights, signs and BatchNorm running statistics, bit for bit
    for n, p in model.named_parameters():
        assert id(p.grad) == grad_ids[n], n
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
        assert p.requires_grad == flags[n]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_snip_and_grasp_touch_no_optimizer(tmp_path):
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters())
    model(**next(_cnn_batches()())).loss.backward()
    opt.step()
    before = {k: {s: t.clone() if torch.is_tensor(t) else t for s, t in v.items()} for k, v in opt.state.items()}
    for method in ("snip", "grasp"):
        _masks(method, model, _cnn_batches(), sparsity=0.5)
    for k, v in opt.state.items():
        for s, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(before[k][s]))


# ---- end to end ---------------------------------------------------------------------------------------------------


class _InputRecorder:
    def __init__(self, model):
        self.sums = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.sums.append(float(kwargs["pixel_values"].sum()))


def _trainer(out, method):
    return TicketTrainer(
        model=make_cnn(),
        args=training_args(out, max_steps=4),
        train_dataset=make_dataset("cnn", 32),
        sparsity_config=SparsityConfig(method=method, sparsity=0.9),
    )


def test_snip_trains_end_to_end_without_shifting_the_data_order(tmp_path):
    trainer = _trainer(tmp_path / "snip", "snip")
    assert trainer.masks.metadata["method"] == "snip"
    assert trainer.masks != _trainer(tmp_path / "mag", "magnitude").masks
    # reading the trainer's own batches for the scores leaves the global RNG as it was
    method, model = trainer.sparsity_method, trainer.model
    rng = torch.random.get_rng_state()
    again = method.initial_masks(model, resolve_targets(model, trainer.sparsity_config), trainer._train_batches)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert again.sparsity() == pytest.approx(0.9, abs=1e-3)  # (another shuffle, pruned weights now zero)

    snip_seen = _InputRecorder(trainer.model)
    trainer.train()
    magnitude = _trainer(tmp_path / "mag2", "magnitude")
    magnitude_seen = _InputRecorder(magnitude.model)
    magnitude.train()
    assert snip_seen.sums == magnitude_seen.sums and len(snip_seen.sums) == 4, "same batches in the same order"
    assert count_violations_of(trainer) == 0
    total = sum(m.numel() for m in trainer.masks.values())
    assert total - sum(int(m.sum()) for m in trainer.masks.values()) == round(0.9 * total)


# ---- configs and refusals -----------------------------------------------------------------------------------------


def test_configs_are_built_and_bad_ones_rejected():
    assert isinstance(SparsityConfig(method="snip", sparsity=0.9), SNIPConfig)
    assert isinstance(SparsityConfig(method="grasp", sparsity=0.9), GraSPConfig)
    cfg = SparsityConfig(method="synflow", sparsity=0.9, input_shape=[3, 8, 8])
    assert isinstance(cfg, SynFlowConfig) and cfg.iterations == 100
    for method in ("snip", "grasp", "synflow"):
        with pytest.raises(ValueError, match="sparsity is required"):
            SparsityConfig(method=method)
        with pytest.raises(ValueError, match="pattern"):
            SparsityConfig(method=method, pattern="2:4")
    with pytest.raises(ValueError, match="score_batches"):
        SparsityConfig(method="snip", sparsity=0.9, score_batches=0)
    with pytest.raises(ValueError, match="iterations"):
        SparsityConfig(method="snip", sparsity=0.9, iterations=0)
    with pytest.raises(ValueError, match="score_batches"):
        SparsityConfig(method="grasp", sparsity=0.9, score_batches=1.5)
    with pytest.raises(ValueError, match="iterations"):
        SparsityConfig(method="synflow", sparsity=0.9, iterations=True)
    with pytest.raises(ValueError, match="input_shape"):
        SparsityConfig(method="synflow", sparsity=0.9, input_shape=[3, 0])
    with pytest.raises(TypeError, match="score_batches belongs to method="):
        SparsityConfig(method="synflow", sparsity=0.9, score_batches=2)


def test_clear_errors_for_models_the_methods_cannot_score():
    with pytest.raises(ValueError, match="input_shape"):
        _masks("synflow", make_bert(), sparsity=0.5, iterations=2)
    with pytest.raises(ValueError, match="input_shape"):
        _masks("synflow", nn.Sequential(nn.Linear(4, 2)), sparsity=0.5, target_modules=["0"])
    masks = _masks("synflow", nn.Sequential(nn.Linear(4, 2)), sparsity=0.5, target_modules=["0"], input_shape=[4])
    assert masks.sparsity() == 0.5
    unlabeled = [{"pixel_values": torch.randn(2, 3, 8, 8)}]
    with pytest.raises(ValueError, match="no `loss`"):
        _masks("snip", make_cnn(), lambda: iter(unlabeled), sparsity=0.5)
    with pytest.raises(ValueError, match="training batches"):
        _masks("grasp", make_cnn(), None, sparsity=0.5)
