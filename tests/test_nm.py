"""N:M sparsity end to end (issue 12): layout, skipping, ASP / periodic / SR-STE training, save, reload, resume,
composition after IMP, the validator and `sparse_inference`'s dispatch (fake timer on the CPU)."""

from __future__ import annotations

import itertools
import json
import logging
import os

import pytest
import torch
from conftest import StopAt, make_bert, make_cnn, make_dataset, make_gpt2, training_args
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hf_tickets import (
    MaskSet,
    SparsityConfig,
    TicketTrainer,
    apply_sparsity,
    load_masks,
    sparse_inference,
    validate_nm,
)
from hf_tickets.cli import main as cli_main
from hf_tickets.nm import check_tensors, group_view, nm_dims, nm_mask, reduction_dim

NM_METHODS = [
    dict(method="magnitude", pattern="2:4"),  # ASP: one-shot magnitude mask, fixed
    dict(method="nm", pattern="2:4", update_interval=2),  # periodic recomputation from dense weights
    dict(method="sr_ste"),  # SR-STE: every step, lambda_W = 2e-4
]
IDS = ["asp", "periodic", "sr_ste"]


def holds(model, names, pattern="2:4") -> bool:
    """Every group of every named weight has at most N nonzeros (from the zeros alone)."""
    params = dict(model.named_parameters())
    report = check_tensors(params, nm_dims(model, names), pattern)
    return report.ok and set(report.tensors) == set(names)


class NMChecker(TrainerCallback):
    """At the end of every optimizer step (after every on_optimizer_step), checks the model's zeros."""

    def __init__(self, names):
        self.names = list(names)
        self.per_step: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.per_step.append(holds(model, self.names))


# ---- which entries of a group are kept --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_top_n_per_group_keeps_the_largest_and_the_lower_index_of_ties(n, m):
    from hf_tickets.nm import top_n_per_group

    gen = torch.Generator().manual_seed(n * 10 + m)
    groups = torch.randint(0, 4, (500, m), generator=gen).float()  # many ties
    groups[0] = float("-inf")  # a group with nothing allowed
    keep = top_n_per_group(groups, n)
    for row, kept in zip(groups.tolist(), keep.tolist()):
        order = sorted(range(m), key=lambda j: (-row[j], j))  # largest first, then the lower index
        assert kept == [j in order[:n] for j in range(m)]
    distinct = torch.randn(300, m, generator=gen)  # without ties it is exactly topk's choice
    reference = torch.zeros_like(distinct, dtype=torch.bool).scatter_(1, distinct.topk(n, 1).indices, True)
    assert torch.equal(top_n_per_group(distinct, n), reference)


# ---- layout ---------------------------------------------------------------------------------------------------


def test_conv2d_groups_match_an_explicit_loop_over_kernel_positions():
    """Groups are M consecutive input channels at each (out, r, s): the channels-last implicit-GEMM operand."""
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 2)
    mask = nm_mask(w.abs(), 2, 4, dim=1)
    expected = torch.zeros_like(mask)
    for o, r, s in itertools.product(range(6), range(3), range(2)):
        for c0 in range(0, 8, 4):
            group = [abs(float(w[o, c, r, s])) for c in range(c0, c0 + 4)]
            for k in sorted(range(4), key=lambda i: -group[i])[:2]:
                expected[o, c0 + k, r, s] = True
    assert torch.equal(mask, expected)
    # group_view reads the weight as [out, kh, kw, in]: row g is (o, r, s, channel block)
    view = group_view(w, 1, 4)
    assert torch.equal(view[1], w[0, 4:8, 0, 0]) and torch.equal(view[2], w[0, 0:4, 0, 1])


def test_reduction_dims_per_layer_type():
    assert reduction_dim(nn.Linear(8, 4)) == 1
    assert reduction_dim(nn.Conv2d(8, 4, 3)) == 1
    assert reduction_dim(nn.Embedding(10, 4)) is None
    assert reduction_dim(nn.ConvTranspose2d(8, 4, 3)) is None
    gpt2 = make_gpt2()
    assert reduction_dim(gpt2.transformer.h[0].mlp.c_fc) == 0  # Conv1D [in, out]


def test_conv2d_end_to_end_masks_follow_the_layout():
    model = make_cnn(num_channels=4)
    w = model.conv2.weight.detach().clone()
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    assert torch.equal(masks["conv2.weight"], nm_mask(w.abs(), 2, 4, 1))
    assert masks.metadata["nm_dims"]["conv2.weight"] == 1


# ---- non-divisible layers -------------------------------------------------------------------------------------


def test_non_divisible_layer_is_skipped_with_a_logged_reason(caplog):
    model = make_cnn()  # conv1 has 3 input channels
    with caplog.at_level(logging.WARNING, logger="hf_tickets.nm"):
        masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    assert "conv1.weight" not in masks and "conv2.weight" in masks
    assert "conv1.weight stays dense" in caplog.text and "not divisible by M=4" in caplog.text
    assert bool((model.conv1.weight != 0).all())


@pytest.mark.parametrize("method", ["magnitude", "nm", "sr_ste"])
def test_non_divisible_layer_named_by_the_user_is_rejected(method):
    with pytest.raises(ValueError, match=r"2:4.*conv1.*reduction size 3"):
        apply_sparsity(make_cnn(), SparsityConfig(method=method, pattern="2:4", target_modules=["conv1", "conv2"]))


# ---- every optimizer step, save, reload, resume ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs", NM_METHODS, ids=IDS)
def test_every_group_holds_after_every_step_and_after_reload(kwargs, tmp_path):
    model = make_bert()
    dense_keys = list(model.state_dict())
    trainer = TicketTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=6, gradient_accumulation_steps=2),
        train_dataset=make_dataset("bert"),
        sparsity_config=SparsityConfig(**kwargs),
    )
    names = list(trainer.masks)
    checker = NMChecker(names)
    trainer.add_callback(checker)
    trainer.train()
    assert checker.per_step == [True] * 6
    assert list(trainer.model.state_dict()) == dense_keys  # no hooks, no parametrization
    trainer.save_model(str(tmp_path / "final"))
    assert validate_nm(str(tmp_path / "final"), "2:4").ok
    from_zeros = validate_nm(str(tmp_path / "final"), "2:4", from_zeros=True)
    assert set(names) <= set(from_zeros.tensors) and not set(from_zeros.bad()) & set(names)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    assert holds(reloaded, names)
    masks = load_masks(str(tmp_path / "final"))
    assert validate_nm(reloaded, "2:4", masks=masks).ok
    for n, p in reloaded.named_parameters():  # the saved weights are the trained model's, exactly
        assert torch.equal(p, dict(trainer.model.named_parameters())[n].detach().cpu()), n


@pytest.mark.parametrize("kwargs", NM_METHODS, ids=IDS)
def test_resumed_run_equals_uninterrupted_and_holds(kwargs, tmp_path):
    def run(out, resume=None, stop=None):


        trainer = TicketTrainer(
            model=make_bert(),
            args=training_args(out, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=5e-2),
            train_dataset=make_dataset("bert"),
            sparsity_config=SparsityConfig(**kwargs),
            callbacks=[StopAt(stop)] if stop else None,
        )
        checker = NMChecker(list(trainer.masks))
        trainer.add_callback(checker)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, checker

    full, _ = run(tmp_path / "full")
    run(tmp_path / "cut", stop=4)  # checkpoint-3 is written, then the run stops after step 4
    resumed, checker = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert checker.per_step == [True] * 3
    a = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, a[n]), n
    assert MaskSet(dict(resumed.masks)) == MaskSet(dict(full.masks))
    assert validate_nm(str(tmp_path / "cut" / "checkpoint-6"), "2:4").ok


# ---- SR-STE ---------------------------------------------------------------------------------------------------


def test_sr_ste_decay_is_added_to_the_gradient_of_pruned_weights_only():
    model = make_bert()
    cfg = SparsityConfig(method="sr_ste", sr_decay=0.5)
    masks = apply_sparsity(model, cfg)  # zeroes pruned weights; the method's dense copy was taken before
    from hf_tickets.methods import build_method
    from hf_tickets.targets import resolve_targets

    model = make_bert()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method(cfg)
    masks = method.initial_masks(model, resolve_targets(model, cfg), None)
    method.on_train_begin(model, masks, 10)
    params = dict(model.named_parameters())
    for n in masks:  # the model holds the projection
        assert torch.equal(params[n], dense[n].masked_fill(~masks[n], 0))
        params[n].grad = torch.ones_like(params[n])
    method.on_dense_grads(model, masks, 1)
    for n in masks:
        expected = torch.ones_like(dense[n]) + 0.5 * dense[n].masked_fill(masks[n], 0)
        assert torch.allclose(params[n].grad, expected)
        assert torch.equal(params[n], dense[n])  # the optimizer steps the dense weights
    assert "bert.encoder.layer.0.output.dense.bias" not in masks  # biases untouched


def _pruned_norm(trainer) -> float:
    method = trainer.sparsity_method
    return sum(float(d.masked_fill(method._masks[n], 0).norm()) for n, d in method._dense.items())


def test_sr_ste_shrinks_pruned_weights_and_saves_exact_n_m(tmp_path):
    def train(decay, out):
        trainer = TicketTrainer(
            model=make_bert(),
            args=training_args(out, max_steps=8, optim="sgd", learning_rate=0.5),
            train_dataset=make_dataset("bert"),
            sparsity_config=SparsityConfig(method="sr_ste", sr_decay=decay),
        )
        trainer.train()
        return trainer

    plain, refined = train(0.0, tmp_path / "a"), train(0.2, tmp_path / "b")
    assert _pruned_norm(refined) < 0.8 * _pruned_norm(plain)
    refined.save_model(str(tmp_path / "final"))
    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    masks = load_masks(str(tmp_path / "final"))
    for n, keep in masks.items():
        assert torch.all(weights[n][~keep] == 0) and torch.all(group_view(keep, 1, 4).sum(1) == 2), n
    # the dense weights went with the checkpoint state, not into the model file
    assert _pruned_norm(refined) > 0


def test_sr_ste_recomputes_masks_and_logs_flip_rate(tmp_path):
    trainer = TicketTrainer(
        model=make_bert(),
        args=training_args(tmp_path, max_steps=5, learning_rate=0.5, optim="sgd"),
        train_dataset=make_dataset("bert"),
        sparsity_config=SparsityConfig(method="sr_ste"),
    )
    before = trainer.masks.clone()
    trainer.train()
    assert trainer.masks != before  # the N:M choice moved during training
    rates = [e["nm/flip_rate"] for e in trainer.state.log_history if "nm/flip_rate" in e]
    assert rates and all(0 <= r <= 1 for r in rates) and max(rates) > 0


# ---- composition ----------------------------------------------------------------------------------------------


def test_n_m_after_imp_keeps_only_surviving_weights(tmp_path):
    model = make_bert()
    ticket = apply_sparsity(model, SparsityConfig(method="magnitude", sparsity=0.6))  # an unstructured ticket
    ticket.save(str(tmp_path / "ticket"))
    cfg = SparsityConfig(method="nm", base_masks=str(tmp_path / "ticket"))
    masks = apply_sparsity(model, cfg)
    for n, keep in masks.items():
        assert not bool((keep & ~ticket[n]).any()), n  # a subset of the ticket
        assert int(group_view(keep, 1, 4).sum(1).max()) <= 2
    assert masks.sparsity() > 0.6
    assert validate_nm(model, "2:4").ok


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="imp", levels=2, pattern="2:4"), "not supported with method='imp'"),
        (dict(method="gradual", sparsity=0.5, end_step=10, pattern="2:4"), "not supported with method='gradual'"),
        (dict(method="nm", pattern="unstructured"), "is not N:M"),
        (dict(method="nm", layer_rates={"classifier": 0.5}), "layer_rates cannot hold"),
        (dict(method="nm", sr_decay=2e-4), "set update_interval"),
        (dict(method="sr_ste", update_interval=None), "update_interval must be >= 1"),
        (dict(method="nm", update_interval=0), "update_interval=0"),
        (dict(method="nm", sparsity=0.9), "contradicts pattern='2:4'"),
    ],
)
def test_combinations_that_cannot_hold_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_base_masks_that_do_not_fit_are_rejected(tmp_path):
    MaskSet({"classifier.weight": torch.ones(3, 32, dtype=torch.bool)}).save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="has no mask for"):
        apply_sparsity(make_bert(), SparsityConfig(method="nm", base_masks=str(tmp_path / "m")))


# ---- the validator --------------------------------------------------------------------------------------------


def test_validator_catches_a_tampered_checkpoint(tmp_path):
    trainer = TicketTrainer(
        model=make_bert(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=make_dataset("bert"),
        sparsity_config=SparsityConfig(pattern="2:4"),
    )
    trainer.train()
    folder = str(tmp_path / "final")
    trainer.save_model(folder)
    assert validate_nm(folder, "2:4").ok
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    keep = load_masks(folder)[name]
    w = weights[name].clone()
    w[~keep] = 1.0  # a pruned weight written back
    weights[name] = w
    save_file(weights, path, metadata={"format": "pt"})
    report = validate_nm(folder, "2:4")
    assert not report.ok and set(report.bad()) == {name}
    assert report.bad()[name]["nonzero_pruned"] == int((~keep).sum())
    assert not validate_nm(folder, "2:4", from_zeros=True).tensors[name]["ok"]
    with pytest.raises(ValueError, match=r"does not hold 2:4.*intermediate"):
        validate_nm(folder, "2:4", strict=True)
    assert cli_main(["inspect", folder]) == 1  # the CLI shows it too


def test_a_save_that_breaks_the_pattern_is_refused(tmp_path):
    trainer = TicketTrainer(
        model=make_bert(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=make_dataset("bert"),
        sparsity_config=SparsityConfig(pattern="2:4"),
    )
    trainer.train()
    with torch.no_grad():
        trainer.model.classifier.weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"before saving.*classifier"):
        trainer.save_model(str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "model.safetensors")


def test_inspect_prints_the_n_m_check(tmp_path, capsys):
    model = make_cnn(num_channels=4)
    apply_sparsity(model, SparsityConfig(pattern="2:4"))
    model.save_pretrained(str(tmp_path / "plain"))  # weights only, no masks
    assert cli_main(["inspect", str(tmp_path / "plain"), "--pattern", "2:4"]) == 0
    out = capsys.readouterr().out
    assert "2:4 from zeros: 3 of 3 tensors hold the pattern" in out and "ok   conv2.weight" in out


def test_gpt2_conv1d_folder_is_checked_along_its_input_dim(tmp_path):
    model = make_gpt2()
    apply_sparsity(model, SparsityConfig(pattern="2:4"))
    model.save_pretrained(str(tmp_path / "g"))
    report = validate_nm(str(tmp_path / "g"), "2:4", from_zeros=True)  # dims from config.json's architecture
    assert report.tensors["transformer.h.0.mlp.c_fc.weight"]["dim"] == 0
    assert all(r["ok"] for n, r in report.tensors.items() if ".h." in n)


# ---- sparse_inference -----------------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 6))
    masks = {f"{i}.weight": nm_mask(model[i].weight.abs(), 2, 4, 1) for i in (0, 2)}
    with torch.no_grad():
        for n, keep in masks.items():
            dict(model.named_parameters())[n].masked_fill_(~keep, 0)
    return model.to(torch.bfloat16)


def test_sparse_inference_without_a_gpu_is_a_no_op(caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model = _mlp()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="hf_tickets.export"):
        report = sparse_inference(model, torch.randn(8, 64, dtype=torch.bfloat16))
    assert report.converted == [] and "no CUDA GPU" in report.message and "no CUDA GPU" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_sparse_inference_keeps_dense_where_the_timer_says_sparse_is_slower():
    _dispatch_with_a_fake_timer()


def _dispatch_with_a_fake_timer():
    model = _mlp()
    timings = {"0": (1.0, 0.5), "2": (1.0, 1.5)}  # layer 0: sparse 2x faster; layer 2: sparse slower
    seen = []

    def fake_timer(name, dense_fn, sparse_fn):
        seen.append(name)
        assert torch.equal(dense_fn(), sparse_fn())  # both arms compute the layer
        if name == "2":  # layer 0 went sparse at once: layer 2 is timed on the input it will really get
            assert isinstance(model[0].weight.data, Marked)
        return timings[name]

    class Marked(torch.Tensor):
        pass

    def fake_convert(weight, x2d):
        assert x2d.shape == (8 * 3, weight.shape[1])  # the layer's own input at the example batch shape
        return weight.detach().clone().as_subclass(Marked)

    report = sparse_inference(model, torch.randn(8, 3, 64, dtype=torch.bfloat16), timer=fake_timer,
                              convert=fake_convert)
    assert seen == ["0", "2"]  # layer 4 (6 outputs x 64) holds no 2:4: never timed
    by_name = {layer.name: layer for layer in report.layers}
    assert report.converted == ["0"]
    assert by_name["0"].chosen == "sparse" and by_name["0"].speedup == pytest.approx(2.0)
    assert by_name["2"].chosen == "dense" and "slower" in by_name["2"].reason
    assert by_name["4"].chosen == "dense" and "does not hold 2:4" in by_name["4"].reason
    assert by_name["0"].input_shape == [8, 3, 64] and by_name["0"].kernel == "injected"
    assert isinstance(model[0].weight.data, Marked) and not isinstance(model[2].weight.data, Marked)
    assert "| 0 | 128x64 | 8x3x64 |" in report.to_markdown()
    return report


def test_sparse_inference_tries_cusparselt_algorithm_ids_in_bfloat16_only():
    from hf_tickets.export import DEFAULT_ALG_IDS, _candidates

    assert list(_candidates(None, DEFAULT_ALG_IDS, torch.bfloat16)) == ["cuSPARSELt alg 0", "cuSPARSELt alg 1"]
    assert list(_candidates(None, (0, 1, 1, 3), torch.bfloat16)) == [f"cuSPARSELt alg {a}" for a in (0, 1, 3)]
    assert list(_candidates(None, DEFAULT_ALG_IDS, torch.float16)) == ["cuSPARSELt alg 0"]  # no hand-set ids in fp16


class _TransposedLayout(nn.Module):
    """Same values, transposed memory layout: what a cuSPARSELt-converted layer hands to the next one."""

    def forward(self, x):
        return x.reshape(-1, x.shape[-1]).t().contiguous().t()


def test_sparse_inference_times_a_transposed_input_also_copied_to_row_major():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), _TransposedLayout(), nn.Linear(128, 64)).to(torch.bfloat16)
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.masked_fill_(~nm_mask(model[i].weight.abs(), 2, 4, 1), 0)
    seen_contiguous: list[bool] = []

    class Recorder(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is nn.functional.linear:
                seen_contiguous.append(args[0].is_contiguous())
            return super().__torch_function__(func, types, args, kwargs or {})

    def fake_timer(name, dense_fn, sparse_fn):
        seen_contiguous.clear()
        sparse_fn()
        # layer 2's input arrives transposed: sparse is slow on it as it is, fast on a row-major copy
        return (1.0, 0.5) if name == "0" or seen_contiguous == [True] else (1.0, 2.0)

    x = torch.randn(16, 64, dtype=torch.bfloat16)
    expected = model(x)
    record = lambda w, x2d: w.detach().clone().as_subclass(Recorder)  # noqa: E731
    report = sparse_inference(model, x, timer=fake_timer, convert=record)
    by_name = {layer.name: layer for layer in report.layers}
    assert report.converted == ["0", "2"]
    assert by_name["0"].kernel == "injected" and by_name["2"].kernel == "injected, input made row-major"
    assert by_name["2"].speedup == pytest.approx(2.0)
    seen_contiguous.clear()
    out = model(x)  # from now on layer 2 gets a row-major copy of its input, through the hook it keeps
    assert seen_contiguous == [True, True] and torch.equal(out, expected)


def test_sparse_inference_report_goes_into_the_model_card(tmp_path):
    report = _dispatch_with_a_fake_timer()
    report.write_to_card(str(tmp_path))
    report.write_to_card(str(tmp_path))  # replaced, not appended
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert card.count("## 2:4 inference, measured") == 1 and "1 of 3 Linear layers run sparse" in card


def test_sparse_inference_rejects_a_conversion_that_changes_the_output():
    model = _mlp()
    report = sparse_inference(
        model,
        torch.randn(4, 64, dtype=torch.bfloat16),
        timer=lambda name, d, s: (1.0, 0.1),
        convert=lambda w, x: torch.zeros_like(w),  # drops the weights: must not be used
    )
    assert report.converted == []
    assert all("differs from dense" in layer.reason for layer in report.layers[:2])


def test_sr_ste_on_conv2d_keeps_the_channels_last_groups(tmp_path):
    from conftest import DictDataset

    data = DictDataset([dict(r, pixel_values=torch.cat([r["pixel_values"], r["pixel_values"][:1]])) for r in
                        make_dataset("cnn").rows])  # 4 input channels, so conv1 holds 2:4 too
    trainer = TicketTrainer(
        model=make_cnn(num_channels=4),
        args=training_args(tmp_path, max_steps=4, learning_rate=0.5, optim="sgd"),
        train_dataset=data,
        sparsity_config=SparsityConfig(method="sr_ste"),
    )
    checker = NMChecker(list(trainer.masks))
    trainer.add_callback(checker)
    trainer.train()
    assert checker.per_step == [True] * 4 and "conv1.weight" in trainer.masks
    method = trainer.sparsity_method
    for name, dense in method._dense.items():  # the mask is the top-2 |dense| of every channel group
        assert torch.equal(trainer.masks[name], nm_mask(dense.abs(), 2, 4, 1)), name
        assert torch.equal(dict(trainer.model.named_parameters())[name], dense.masked_fill(~trainer.masks[name], 0))


@pytest.mark.parametrize("kwargs", NM_METHODS[1:], ids=IDS[1:])
def test_dense_mode_model_holds_the_projection_before_training(kwargs, tmp_path):
    model = make_bert()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = TicketTrainer(model=model, args=training_args(tmp_path), train_dataset=make_dataset("bert"),
                            sparsity_config=SparsityConfig(**kwargs))
    assert holds(model, list(trainer.masks))
    trainer.save_model(str(tmp_path / "untrained"))  # passes the check before saving
    assert validate_nm(str(tmp_path / "untrained"), "2:4").ok
    for n, d in trainer.sparsity_method._dense.items():  # training starts from the dense weights, not the zeros
        assert torch.equal(d, dense[n]), n


def test_inspect_json_includes_the_n_m_report(tmp_path, capsys):
    model = make_cnn(num_channels=4)
    masks = apply_sparsity(model, SparsityConfig(pattern="2:4"))
    masks.save(str(tmp_path / "m"))
    assert cli_main(["inspect", str(tmp_path / "m" / "masks.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object
    assert out["sparsity"] == 0.5 and out["nm"]["ok"] and out["nm"]["tensors"]["conv2.weight"]["bad_groups"] == 0
