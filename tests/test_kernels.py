"""The one-launch masked zeroing must equal the foreach reference exactly, on any sizes and dtypes."""

import pytest
import torch

from hf_tickets.kernels import MultiTensorMasker, zero_pruned_


def _case(device, dtype, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in sizes]
    masks = [torch.rand(s, generator=g).lt(0.3).to(device) for s in sizes]
    return targets, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_matches_reference_on_cpu(dtype):
    targets, masks = _case("cpu", dtype, [(7, 5), (4096,), (3, 3, 3, 2)], seed=0)
    expected = [t * m for t, m in zip(targets, masks)]
    masker = MultiTensorMasker(masks)
    assert not masker.enabled  # no CUDA: the foreach path runs
    zero_pruned_(targets, masks, masker)
    for got, want in zip(targets, expected):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sizes = [(768, 768), (1,), (4095,), (4097,), (3072, 768), (64, 3, 3, 3), (13, 17)]
    for seed in range(3):
        targets, masks = _case("cuda", dtype, sizes, seed)
        expected = [t * m for t, m in zip(targets, masks)]
        masker = MultiTensorMasker(masks)
        assert masker.enabled
        assert masker.zero_pruned_(targets)  # the kernel served the call
        for got, want in zip(targets, expected):
            assert torch.equal(got, want)
        # New storage (as gradients get every step) is picked up: offsets are rebuilt.
        fresh = [torch.randn_like(t) for t in targets]
        ref = [t * m for t, m in zip(fresh, masks)]
        assert masker.zero_pruned_(fresh)
        for got, want in zip(fresh, ref):
            assert torch.equal(got, want)
