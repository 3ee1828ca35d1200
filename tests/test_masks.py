"""MaskSet: statistics, enforcement, algebra, bit packing and masks.safetensors I/O."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import make_bert, make_cnn
from safetensors import safe_open
from torch import nn

from hf_tickets import MaskSet, SparsityConfig, __version__, apply_sparsity, load_masks
from hf_tickets.enforce import MaskEnforcer, apply_masks_, count_violations
from hf_tickets.files import SPARSITY_REPORT_NAME as REPORT_NAME
from hf_tickets.masks import MASKS_NAME, pack_bits, unpack_bits


def _mlp_and_masks():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = MaskSet(
        {
            "0.weight": torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool),  # 6 of 12 kept
            "2.weight": torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool),  # 3 of 6 kept
        },
        metadata={"method": "manual", "level": 2},
    )
    return mlp, masks


# ---- statistics -------------------------------------------------------------------------------------------------


def test_overall_and_per_layer_sparsity():
    _, masks = _mlp_and_masks()
    assert masks.numel() == 18 and masks.kept() == 9
    assert masks.sparsity() == pytest.approx(0.5) and masks.density() == pytest.approx(0.5)
    assert masks.layer_sparsity() == pytest.approx({"0.weight": 0.5, "2.weight": 0.5})
    uneven = MaskSet({"a": torch.tensor([1, 0, 0, 0]), "b": torch.ones(4)})
    assert uneven.sparsity() == pytest.approx(3 / 8)
    assert uneven.layer_sparsity() == pytest.approx({"a": 0.75, "b": 0.0})


def test_report():
    _, masks = _mlp_and_masks()
    report = masks.report()
    assert report["sparsity"] == pytest.approx(0.5) and report["numel"] == 18 and report["kept"] == 9
    assert report["layers"]["0.weight"] == {"shape": [3, 4], "numel": 12, "kept": 6, "sparsity": 0.5}


def test_empty_maskset():
    empty = MaskSet({})
    assert len(empty) == 0 and empty.sparsity() == 0.0 and empty.numel() == 0


def test_mapping_interface_and_bool_conversion():
    masks = MaskSet({"w": torch.tensor([[0.0, 2.0], [1.0, 0.0]])})
    assert list(masks) == ["w"] and len(masks) == 1 and "w" in masks
    assert masks["w"].dtype == torch.bool
    assert masks["w"].tolist() == [[False, True], [True, False]]
    with pytest.raises(TypeError):
        MaskSet({"w": [[1, 0]]})
    assert "MaskSet(1 tensors" in repr(masks)


# ---- enforcement ------------------------------------------------------------------------------------------------


def test_apply_zeroes_exactly_the_masked_weights():
    mlp, masks = _mlp_and_masks()
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    assert count_violations(mlp, masks) > 0
    apply_masks_(mlp, masks)
    assert count_violations(mlp, masks) == 0
    params = dict(mlp.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0)
        assert torch.equal(params[name][m], before[name][m]), "kept weights must not change"
    for name in ("0.bias", "2.bias"):
        assert torch.equal(params[name], before[name])


def test_mask_grads_zeroes_masked_gradients_and_skips_missing_ones():
    mlp, masks = _mlp_and_masks()
    mlp(torch.randn(5, 4)).sum().backward()
    mlp[2].weight.grad = None  # a parameter without a gradient is skipped, not an error
    grads_before = mlp[0].weight.grad.clone()
    MaskEnforcer(masks, mlp).mask_grads_()
    m = masks["0.weight"]
    assert torch.all(mlp[0].weight.grad[~m] == 0)
    assert torch.equal(mlp[0].weight.grad[m], grads_before[m])
    assert mlp[2].weight.grad is None


def test_apply_does_not_record_autograd_history():
    mlp, masks = _mlp_and_masks()
    apply_masks_(mlp, masks)
    assert mlp[0].weight.grad_fn is None and mlp[0].weight.is_leaf


def test_apply_works_after_dtype_change():
    model = make_bert()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.7))
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    apply_masks_(model, masks)
    assert count_violations(model, masks) == 0


def test_apply_rebinds_for_another_model():
    mlp, masks = _mlp_and_masks()
    apply_masks_(mlp, masks)
    other, _ = _mlp_and_masks()
    apply_masks_(other, masks)
    assert count_violations(other, masks) == 0


def test_validate_for():
    mlp, masks = _mlp_and_masks()
    masks.validate_for(mlp)
    with pytest.raises(ValueError, match="does not have"):
        MaskSet({"nope.weight": torch.ones(3, 4)}).validate_for(mlp)
    with pytest.raises(ValueError, match="shape"):
        MaskSet({"0.weight": torch.ones(4, 3)}).validate_for(mlp)


# ---- algebra ----------------------------------------------------------------------------------------------------


def test_is_subset_of():
    _, masks = _mlp_and_masks()
    smaller = masks.clone()
    smaller["0.weight"][0, 0] = False
    assert smaller.is_subset_of(masks) and masks.is_subset_of(masks)
    assert not masks.is_subset_of(smaller)
    grown = masks.clone()
    grown["2.weight"][1, 0] = True
    assert not grown.is_subset_of(masks)
    assert not MaskSet({"0.weight": masks["0.weight"]}).is_subset_of(masks), "different tensor names"


def test_equality():
    _, masks = _mlp_and_masks()
    assert masks == masks.clone()
    assert masks == MaskSet(dict(masks.items()), metadata={"other": "metadata"}), "equality compares masks only"
    changed = masks.clone()
    changed["0.weight"][2, 3] = True
    assert masks != changed
    assert masks != MaskSet({"0.weight": masks["0.weight"]})
    assert masks != dict(masks.items())


def test_clone_is_a_copy_not_an_alias():
    _, masks = _mlp_and_masks()
    copy = masks.clone()
    copy["0.weight"].fill_(True)
    copy.metadata["method"] = "changed"
    assert masks.kept() == 9 and masks.metadata["method"] == "manual"


def test_to_device():
    _, masks = _mlp_and_masks()
    moved = masks.to("cpu")
    assert moved == masks and moved.metadata == masks.metadata


# ---- bit packing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (13, 7), (3, 5, 3, 3), (5, 1, 1), (2, 3, 5, 7, 11), ()])
@pytest.mark.parametrize("density", [0.0, 0.37, 1.0])
def test_pack_unpack_round_trip_odd_sizes(shape, density):
    g = torch.Generator().manual_seed(sum(shape) + int(100 * density))
    mask = torch.rand(shape, generator=g) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.is_contiguous()
    assert packed.numel() == math.ceil(mask.numel() / 8)
    out = unpack_bits(packed, tuple(shape))
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert torch.equal(out, mask)


def test_pack_bit_order_is_msb_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10000001, 0b10000000]


def test_unpack_rejects_too_few_bits():
    with pytest.raises(ValueError, match="fewer"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), (3, 3))


# ---- masks.safetensors ------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_header_metadata(tmp_path):
    model = make_cnn()
    masks = apply_sparsity(model, SparsityConfig(method="random", sparsity=0.6, seed=4))
    path = masks.save(tmp_path, extra_metadata={"level": 3, "rewind_step": 10})
    assert path == os.path.join(tmp_path, MASKS_NAME)
    assert sorted(os.listdir(tmp_path)) == [MASKS_NAME, REPORT_NAME], "no temporary files may be left"

    with safe_open(path, framework="pt") as fh:
        header = fh.metadata()
        assert set(fh.keys()) == set(masks)
        for name in masks:
            t = fh.get_tensor(name)
            assert t.dtype == torch.uint8 and t.numel() == math.ceil(masks[name].numel() / 8), "bit-packed on disk"
    assert header["format"] == "pt" and header["hf_tickets_version"] == __version__
    info = json.loads(header["hf_tickets_masks"])
    for name, m in masks.items():
        assert info["tensors"][name]["shape"] == list(m.shape)
        assert info["tensors"][name]["sparsity"] == pytest.approx(1 - m.float().mean().item(), abs=1e-7)
    assert info["metadata"]["method"] == "random" and info["metadata"]["seed"] == 4
    assert info["metadata"]["level"] == 3 and info["metadata"]["rewind_step"] == 10

    loaded = MaskSet.load(path)
    assert loaded == masks
    assert all(loaded[n].dtype == torch.bool for n in loaded)
    assert loaded.metadata["seed"] == 4 and loaded.metadata["pattern"] == "unstructured"
    assert MaskSet.load(tmp_path) == masks, "a folder works too"
    assert load_masks(tmp_path) == masks and load_masks(path) == masks

    report = json.loads((tmp_path / REPORT_NAME).read_text())
    assert report["sparsity"] == pytest.approx(masks.sparsity())
    assert set(report["layers"]) == set(masks)


def test_saved_masks_keep_the_order_of_names(tmp_path):
    model = make_bert()
    masks = apply_sparsity(model, SparsityConfig(sparsity=0.5))
    masks.save(tmp_path)
    assert list(load_masks(tmp_path)) == list(masks)


def test_save_overwrites(tmp_path):
    _mlp, masks = _mlp_and_masks()
    masks.save(tmp_path)
    denser = MaskSet({n: torch.ones_like(m) for n, m in masks.items()})
    denser.save(tmp_path)
    assert load_masks(tmp_path) == denser
