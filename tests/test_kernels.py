"""`MultiTensorMasker.zero_pruned_`: targets[i][~masks[i]] = 0, exactly, by writing zeros.

CPU tests cover the masked_fill_ fallback and, through a pure-torch emulation of the kernel's programs, the bit
packing and the block table the CUDA kernel runs over (including the blocks it skips because their mask keeps
everything). The `gpu` tests compare the Triton kernel itself with `torch.where(mask, t, 0)` bit for bit; run them
on a CUDA machine with `python -m pytest -m gpu tests/test_kernels.py`.
"""

from __future__ import annotations

import pytest
import torch

from hf_tickets import kernels
from hf_tickets.kernels import (
    BLOCK,
    BLOCK_WORDS,
    MultiTensorMasker,
    block_table,
    pack_mask_bits,
    unpack_mask_bits,
)

# Odd sizes: 1 element, not multiples of 8 or 32 (the bit packing), around a word, around a block.
ODD_SIZES = [(1,), (7,), (13, 17), (31,), (33,), (4095,), (4097,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3, 5, 7)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: equal bits means equal values, NaN payloads and the sign of zero included."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _targets(sizes, dtypes, device="cpu", seed=0, density=0.3, specials=True):
    """Random targets with NaN, +-inf and -0.0 sprinkled over kept and pruned entries alike, and random masks."""
    g = torch.Generator().manual_seed(seed)
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * len(sizes)
    targets, masks = [], []
    for size, dtype in zip(sizes, dtypes):
        t = torch.randn(size, generator=g)
        if specials:
            flat = t.view(-1)
            pick = torch.randint(0, 5, flat.shape, generator=g)
            flat[pick == 1] = float("nan")
            flat[pick == 2] = float("inf")
            flat[pick == 3] = -0.0
            flat[(pick == 4) & (torch.rand(flat.shape, generator=g) < 0.5)] = float("-inf")
        targets.append(t.to(device=device, dtype=dtype))
        masks.append(torch.rand(size, generator=g).lt(density).to(device))
    return targets, masks


def _reference(targets, masks):
    return [torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t, m in zip(targets, masks)]


def _assert_bit_equal(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(_bits(g), _bits(w))


def _emulate_kernel(masks, targets):
    """What the Triton kernel does, program by program, in plain torch on the CPU: read the block table and the
    packed bits, store zeros where a bit is 0. Entries of blocks missing from the table are never touched."""
    words, offsets = pack_mask_bits(masks)
    table = block_table(masks, offsets)
    for tensor, start, word0, left, _ in table.tolist():
        n = min(left, BLOCK)
        chunk = words[word0 : word0 + (n + 31) // 32]
        bits = ((chunk.view(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n]
        flat = targets[tensor].view(-1)
        flat[start : start + n] = torch.where(bits.bool(), flat[start : start + n], torch.zeros((), dtype=flat.dtype))
    return table


# ---- the masked_fill_ fallback (what runs on CPU) -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fallback_writes_zeros_over_nan_and_inf_and_leaves_kept_bits_alone(dtype):
    targets, masks = _targets(ODD_SIZES, dtype, seed=1)
    assert any(t[~m].isnan().any() for t, m in zip(targets, masks)), "the case must have NaN in pruned entries"
    expected = _reference(targets, masks)
    masker = MultiTensorMasker(masks)
    assert not masker.enabled  # CPU: the fallback runs
    masker.zero_pruned_(targets)
    _assert_bit_equal(targets, expected)
    for t, m in zip(targets, masks):
        assert not t[~m].isnan().any() and not t[~m].isinf().any()
        assert (_bits(t[~m]) == 0).all(), "pruned entries are +0.0 (a store, not a multiply)"


def test_fallback_mixed_dtypes_in_one_call():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64] * 3
    sizes = ODD_SIZES[: len(dtypes)]
    targets, masks = _targets(sizes, dtypes[: len(sizes)], seed=2)
    expected = _reference(targets, masks)
    MultiTensorMasker(masks).zero_pruned_(targets)
    _assert_bit_equal(targets, expected)


def test_fallback_is_idempotent_and_masks_are_left_as_given():
    targets, masks = _targets([(5, 6), (40,)], torch.float32, seed=3)
    given = [m.clone() for m in masks]
    masker = MultiTensorMasker(masks)
    assert masker.masks[0] is masks[0] and masker.masks[1] is masks[1]
    masker.zero_pruned_(targets)
    once = [t.clone() for t in targets]
    masker.zero_pruned_(targets)
    _assert_bit_equal(targets, once)
    assert all(torch.equal(a, b) for a, b in zip(masks, given))


def test_subset_is_cached_and_masks_only_its_tensors():
    targets, masks = _targets([(3, 4), (9,), (2, 2, 2)], torch.float32, seed=4)
    masker = MultiTensorMasker(masks)
    sub = masker.subset([0, 2])
    assert masker.subset([0, 2]) is sub and masker.subset((0, 2)) is sub
    assert sub.masks[0] is masks[0] and sub.masks[1] is masks[2]
    untouched = targets[1].clone()
    expected = _reference(targets, masks)
    sub.zero_pruned_([targets[0], targets[2]])
    _assert_bit_equal([targets[0], targets[2]], [expected[0], expected[2]])
    assert torch.equal(_bits(targets[1]), _bits(untouched))


def test_wrong_number_of_targets_is_an_error():
    targets, masks = _targets([(4,), (5,)], torch.float32)
    with pytest.raises(ValueError, match="2 masks"):
        MultiTensorMasker(masks).zero_pruned_(targets[:1])


def test_empty_mask_list():
    masker = MultiTensorMasker([])
    masker.zero_pruned_([])
    assert not masker.enabled


# ---- bit packing and block table (what the CUDA kernel reads), checked on the CPU --------------------------------


def test_packed_bits_are_little_endian_per_32_bit_word_and_padded_with_kept():
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[0, 1, 5, 31, 32, 39]] = True
    words, offsets = pack_mask_bits([mask])
    assert words.dtype == torch.int32 and offsets == [0] and words.numel() == 2
    # word 0: bits 0, 1, 5, 31 -> 0b1000...100011 (bit 31 set: negative as int32)
    assert int(words[0]) == (1 | 2 | 32 | (1 << 31)) - (1 << 32)
    # word 1: elements 32 and 39 are bits 0 and 7; bits 8..31 are padding and read as kept
    assert (int(words[1]) & 0xFFFFFFFF) == (1 | (1 << 7) | (0xFFFFFFFF ^ 0xFF))


@pytest.mark.parametrize("seed", range(3))
def test_pack_unpack_roundtrip_on_odd_sizes(seed):
    _, masks = _targets(ODD_SIZES, torch.float32, seed=seed, specials=False)
    words, offsets = pack_mask_bits(masks)
    assert words.numel() == sum((m.numel() + 31) // 32 for m in masks)
    for mask, offset in zip(masks, offsets):
        assert torch.equal(unpack_mask_bits(words, offset, mask.shape), mask)


def test_block_table_skips_blocks_that_keep_everything():
    n = 3 * BLOCK + 5
    mask = torch.ones(n, dtype=torch.bool)
    mask[7] = False  # block 0 prunes one entry
    mask[2 * BLOCK + 100] = False  # block 2 too; blocks 1 and 3 keep everything
    all_kept = torch.ones(10, dtype=torch.bool)
    pruned_tail = torch.ones(BLOCK + 3, dtype=torch.bool)
    pruned_tail[-1] = False  # only the last, 3-element block of this tensor prunes
    masks = [mask, all_kept, pruned_tail]
    _, offsets = pack_mask_bits(masks)
    table = block_table(masks, offsets)
    assert table.tolist() == [
        [0, 0, 0, n, 0],
        [0, 2 * BLOCK, 2 * BLOCK_WORDS, n - 2 * BLOCK, 0],
        [2, BLOCK, offsets[2] + BLOCK_WORDS, 3, 0],
    ]


def test_block_table_marks_sparse_blocks_for_whole_block_stores():
    """The last column: 1 where a block keeps at most REWRITE_KEPT_MAX_DENSITY of its own entries (a short last
    block is judged by its own size)."""
    limit = kernels.REWRITE_KEPT_MAX_DENSITY
    mask = torch.zeros(2 * BLOCK + 10, dtype=torch.bool)
    mask[: int(BLOCK * limit) + 1] = True  # block 0: just over the limit
    mask[BLOCK : BLOCK + int(BLOCK * limit)] = True  # block 1: at the limit
    mask[2 * BLOCK : 2 * BLOCK + 2] = True  # block 2 (10 entries): 2 kept
    mask[-1] = True  # and a third at its end
    _, offsets = pack_mask_bits([mask])
    table = block_table([mask], offsets)
    assert [row[4] for row in table.tolist()] == [0, 1, int(3 <= limit * 10)]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.97, 1.0])
def test_emulated_kernel_equals_reference_so_skipped_blocks_are_exact(density):
    """The skip is exact: running only the table's blocks gives torch.where(mask, t, 0) bit for bit, also with
    masks that keep everything (no block at all) or nothing."""
    sizes = ODD_SIZES + [(2 * BLOCK + 17,)]
    targets, masks = _targets(sizes, torch.float32, seed=5, density=density)
    if 0.0 < density < 1.0:  # whole blocks that keep everything, in the middle of a tensor
        masks[-1][BLOCK : 2 * BLOCK] = True
    expected = _reference(targets, masks)
    table = _emulate_kernel(masks, targets)
    _assert_bit_equal(targets, expected)
    if density == 1.0:
        assert table.shape[0] == 0
    elif 0.0 < density < 1.0:
        assert BLOCK not in [start for t, start, *_ in table.tolist() if t == len(sizes) - 1]


def test_kernel_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv("HF_TICKETS_DISABLE_TRITON", "1")
    _, masks = _targets([(4,)], torch.float32)
    assert not MultiTensorMasker(masks).enabled


# ---- the Triton kernel on CUDA ------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _cuda_masker(masks, monkeypatch, strict=False):
    if not torch.cuda.is_available() or not kernels._HAS_TRITON:
        pytest.skip("needs CUDA and Triton")
    monkeypatch.delenv("HF_TICKETS_DISABLE_TRITON", raising=False)
    if strict:
        monkeypatch.setenv("HF_TICKETS_STRICT_WRITES", "1")
    else:
        monkeypatch.delenv("HF_TICKETS_STRICT_WRITES", raising=False)
    masker = MultiTensorMasker(masks)
    assert masker.enabled
    return masker


def _launches(masker):
    return masker.launches + sum(sub.launches for sub in masker._subsets.values())


def _first_launches(monkeypatch):
    """Record the kernel launches with their constexpr arguments."""
    calls = []
    original = kernels._zero_pruned_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append({"grid": grid, **{k: v for k, v in kwargs.items() if k.isupper()}})
                return original[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_zero_pruned_kernel", Spy())
    return calls


@gpu
@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_kernel_is_bit_exact_on_odd_sizes_with_nan_and_inf(dtype, density, strict, monkeypatch):
    sizes = ODD_SIZES + [(768, 768), (3072, 768), (64, 3, 3, 3), (2 * BLOCK + 17,)]
    for seed in range(3):
        targets, masks = _targets(sizes, dtype, device="cuda", seed=seed, density=density)
        masks[-1][BLOCK : 2 * BLOCK] = True  # a skipped block in the middle of a tensor
        expected = _reference(targets, masks)
        masker = _cuda_masker(masks, monkeypatch, strict=strict)
        calls = _first_launches(monkeypatch)
        masker.zero_pruned_(targets)
        assert _launches(masker) == 1 and len(calls) == 1, "one launch for all tensors"
        assert calls[0]["REWRITE_KEPT"] == (not strict and targets[0].element_size() >= 4)
        _assert_bit_equal(targets, expected)
        for t, m in zip(targets, masks):
            assert (_bits(t[~m]) == 0).all()
        # Again on fresh values at the same addresses: the cached table.
        fresh, _ = _targets(sizes, dtype, device="cuda", seed=seed + 10, density=density)
        for t, f in zip(targets, fresh):
            t.copy_(f)
        masker.zero_pruned_(targets)
        assert _launches(masker) == 2 and masker.table_builds == 1
        _assert_bit_equal(targets, _reference(fresh, masks))


@gpu
def test_kernel_mixes_whole_block_and_write_only_blocks_in_one_launch(monkeypatch):
    sizes = [(BLOCK * 2,), (BLOCK + 5,), (768, 768), (4097,)]
    densities = [0.02, 0.9, 0.1, 0.6]
    g = torch.Generator().manual_seed(13)
    targets, masks = _targets(sizes, torch.float32, device="cuda", seed=13)
    masks = [(torch.rand(s, generator=g) < d).cuda() for s, d in zip(sizes, densities)]
    masker = _cuda_masker(masks, monkeypatch)
    whole = masker.blocks[:, 4].tolist()
    assert 0 in whole and 1 in whole
    expected = _reference(targets, masks)
    masker.zero_pruned_(targets)
    _assert_bit_equal(targets, expected)


@gpu
def test_kernel_follows_reallocated_targets_and_caches_tables(monkeypatch):
    sizes = [(33,), (4097,), (768, 768), (BLOCK + 1,)]
    weights, masks = _targets(sizes, torch.float32, device="cuda", seed=7)
    masker = _cuda_masker(masks, monkeypatch)
    for step in range(6):
        # As under zero_grad(set_to_none=True): fresh gradient tensors every step, alternating with the weights.
        grads, _ = _targets(sizes, torch.float32, device="cuda", seed=100 + step)
        grads = [g.clone() for g in grads]  # new storage, at whatever address the allocator gives
        want = _reference(grads, masks)
        masker.zero_pruned_(grads)
        _assert_bit_equal(grads, want)
        want_w = _reference(weights, masks)
        masker.zero_pruned_(weights)
        _assert_bit_equal(weights, want_w)
        del grads
    assert _launches(masker) == 12, "every call ran the kernel"
    assert masker.table_builds <= 1 + 6, "the weights' table is built once"
    builds = masker.table_builds
    for _ in range(3):  # the same tensors again: no new table
        masker.zero_pruned_(weights)
    assert masker.table_builds == builds


@gpu
def test_kernel_same_pointers_other_dtype_gets_its_own_table(monkeypatch):
    sizes = [(100,), (4097,)]
    targets, masks = _targets(sizes, torch.float32, device="cuda", seed=8)
    masker = _cuda_masker(masks, monkeypatch)
    masker.zero_pruned_(targets)
    # bf16 views of the same storage: the same data_ptrs, another element size (so other element offsets).
    halves = [t.view(torch.bfloat16)[: t.numel()] for t in targets]
    halves[0].copy_(torch.randn(100, device="cuda").to(torch.bfloat16))
    halves[1].copy_(torch.randn(4097, device="cuda").to(torch.bfloat16))
    assert [h.data_ptr() for h in halves] == [t.data_ptr() for t in targets]
    want = _reference(halves, masks)
    masker.zero_pruned_(halves)
    _assert_bit_equal(halves, want)
    assert masker.table_builds == 2


@gpu
def test_kernel_same_pointers_non_contiguous_falls_back(monkeypatch):
    """A cached table is not used for a non-contiguous view at the same addresses (the transpose of a square
    matrix): the fallback serves it."""
    masks = [torch.rand(64, 64, device="cuda") < 0.3, torch.rand(33, device="cuda") < 0.3]
    targets = [torch.randn(64, 64, device="cuda"), torch.randn(33, device="cuda")]
    masker = _cuda_masker(masks, monkeypatch)
    masker.zero_pruned_(targets)
    assert _launches(masker) == 1
    transposed = [targets[0].t(), targets[1]]
    for t in transposed:
        t.copy_(torch.randn_like(t))
    want = _reference(transposed, masks)
    masker.zero_pruned_(transposed)
    assert _launches(masker) == 1
    _assert_bit_equal(transposed, want)


@gpu
def test_kernel_mixed_dtypes_one_launch_per_dtype(monkeypatch):
    sizes = [(7,), (4095,), (13, 17), (4097,), (BLOCK + 1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    for seed in (9, 10):  # the second call hits the cached groups
        targets, masks = _targets(sizes, dtypes, device="cuda", seed=9)
        fresh, _ = _targets(sizes, dtypes, device="cuda", seed=seed + 20)
        if seed == 9:
            masker = _cuda_masker(masks, monkeypatch)
            kept = targets
        for t, f in zip(kept, fresh):
            t.copy_(f)
        expected = _reference(kept, masker.masks)
        masker.zero_pruned_(kept)
        assert _launches(masker) == 3 * (seed - 8)
        _assert_bit_equal(kept, expected)


@gpu
def test_kernel_non_contiguous_targets_fall_back(monkeypatch):
    masks = [torch.rand(64, 48, device="cuda") < 0.3, torch.rand(33, device="cuda") < 0.3]
    targets = [torch.randn(48, 64, device="cuda").t(), torch.randn(33, device="cuda")]
    expected = _reference(targets, masks)
    masker = _cuda_masker(masks, monkeypatch)
    masker.zero_pruned_(targets)
    assert _launches(masker) == 0
    _assert_bit_equal(targets, expected)


@gpu
def test_kernel_all_kept_writes_nothing_and_empty_tensors_are_fine(monkeypatch):
    masks = [torch.ones(4097, dtype=torch.bool, device="cuda"), torch.ones(0, dtype=torch.bool, device="cuda")]
    targets = [torch.full((4097,), float("nan"), device="cuda"), torch.empty(0, device="cuda")]
    masker = _cuda_masker(masks, monkeypatch)
    assert masker.blocks.shape[0] == 0
    masker.zero_pruned_(targets)
    assert targets[0].isnan().all()


@gpu
def test_kernel_subset_and_masker_matches_fallback(monkeypatch):
    sizes = [(31,), (4095,), (768, 3072), (BLOCK - 1,)]
    targets, masks = _targets(sizes, torch.bfloat16, device="cuda", seed=10)
    copies = [t.clone() for t in targets]
    masker = _cuda_masker(masks, monkeypatch)
    sub = masker.subset([1, 3])
    assert sub.enabled and masker.subset([1, 3]) is sub
    sub.zero_pruned_([targets[1], targets[3]])
    monkeypatch.setenv("HF_TICKETS_DISABLE_TRITON", "1")
    fallback = MultiTensorMasker(masks).subset([1, 3])
    assert not fallback.enabled
    fallback.zero_pruned_([copies[1], copies[3]])
    _assert_bit_equal(targets, copies)


@gpu
@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_kernel_unaligned_views_of_one_buffer(strict, monkeypatch):
    """Targets that are views at odd element offsets of one flat buffer; the buffer's other entries, between and
    around them, are never touched."""
    sizes = [(33,), (4097,), (5, 7), (BLOCK + 3,)]
    g = torch.Generator().manual_seed(11)
    total = sum(torch.Size(s).numel() + 3 for s in sizes) + 1
    flat = torch.randn(total, generator=g).cuda()
    flat[::7] = float("nan")
    before = flat.clone()
    targets, masks, at, inside = [], [], 1, torch.zeros(total, dtype=torch.bool)
    for size in sizes:
        n = torch.Size(size).numel()
        targets.append(flat[at : at + n].view(size))
        inside[at : at + n] = True
        masks.append((torch.rand(size, generator=g) < 0.1).cuda())
        at += n + 3
    expected = _reference(targets, masks)
    masker = _cuda_masker(masks, monkeypatch, strict=strict)
    masker.zero_pruned_(targets)
    assert _launches(masker) == 1
    _assert_bit_equal(targets, expected)
    outside = ~inside.cuda()
    assert torch.equal(_bits(flat[outside]), _bits(before[outside]))
