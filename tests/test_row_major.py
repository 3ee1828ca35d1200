"""`row_major(x)`: the same values as `x.contiguous()`, bit for bit, in a row-major buffer.

CPU tests cover which layouts count as a transposed 2-D activation and the `x.contiguous()` fallback. The `gpu`
tests run the Triton tile transpose itself (odd sizes, 3-D activations, every float dtype); run them on a CUDA
machine with `python -m pytest -m gpu tests/test_row_major.py`.
"""

from __future__ import annotations

import pytest
import torch

from hf_tickets import row_major as module
from hf_tickets.row_major import _transposed_2d, row_major


def _transposed(tokens: int, features: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[tokens, features] with strides (1, tokens): what cuSPARSELt's transposed result looks like."""
    return torch.randn(features, tokens, device=device).to(dtype).t()


def test_transposed_layouts_are_recognised():
    assert _transposed_2d(_transposed(8, 5))
    assert _transposed_2d(_transposed(12, 5).view(3, 4, 5))  # [batch, seq, features] over one transposed buffer
    assert not _transposed_2d(torch.randn(8, 5))  # row-major already
    assert not _transposed_2d(torch.randn(8, 10)[:, ::2])  # strided, not a transpose
    assert not _transposed_2d(torch.randn(5, 3, 4).permute(2, 0, 1))  # no single 2-D view
    assert not _transposed_2d(_transposed(1, 5))  # one token: already row-major in effect
    assert not _transposed_2d(torch.randn(7))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _transposed(9, 7),
        lambda: _transposed(12, 5).view(3, 4, 5),
        lambda: torch.randn(8, 10)[:, ::2],
        lambda: torch.randn(5, 3, 4).permute(2, 0, 1),
    ],
    ids=["transposed", "transposed-3d", "strided", "permuted"],
)
def test_cpu_gives_a_row_major_copy_of_the_same_values(make):
    x = make()
    out = row_major(x)
    assert out.is_contiguous() and out.shape == x.shape and torch.equal(out, x)


def test_a_row_major_input_is_returned_as_it_is():
    x = torch.randn(4, 6)
    assert row_major(x) is x


# ---- the Triton kernel on CUDA ------------------------------------------------------------------------------------


def _needs_kernel(monkeypatch):
    if not torch.cuda.is_available() or not module._HAS_TRITON:
        pytest.skip("needs CUDA and Triton")
    monkeypatch.delenv("HF_TICKETS_DISABLE_TRITON", raising=False)


def _spy_launches(monkeypatch) -> list:
    grids = []
    original = module._transpose_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return original[grid]

    monkeypatch.setattr(module, "_transpose_kernel", Spy())
    return grids


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,features", [(64, 64), (65, 130), (1000, 37), (3, 4096), (4096, 3)])
def test_kernel_equals_contiguous_bit_for_bit(monkeypatch, dtype, tokens, features):
    _needs_kernel(monkeypatch)
    grids = _spy_launches(monkeypatch)
    x = _transposed(tokens, features, dtype, "cuda")
    x[0, 0] = float("nan")  # a copy: NaN payloads come through too
    out = row_major(x)
    assert grids, "the Triton kernel did not run"
    assert out.is_contiguous() and out.shape == x.shape
    assert torch.equal(out.view(torch.int8), x.contiguous().view(torch.int8))


@pytest.mark.gpu
def test_kernel_keeps_a_3d_activation_shape(monkeypatch):
    _needs_kernel(monkeypatch)
    grids = _spy_launches(monkeypatch)
    x = _transposed(2 * 77, 96, torch.bfloat16, "cuda").view(2, 77, 96)
    out = row_major(x)
    assert grids and out.shape == (2, 77, 96) and out.is_contiguous() and torch.equal(out, x)


@pytest.mark.gpu
def test_other_layouts_take_the_plain_copy(monkeypatch):
    _needs_kernel(monkeypatch)
    grids = _spy_launches(monkeypatch)
    x = torch.randn(64, 128, device="cuda")[:, ::2]
    assert torch.equal(row_major(x), x) and not grids
    monkeypatch.setenv("HF_TICKETS_DISABLE_TRITON", "1")
    y = _transposed(64, 64, torch.bfloat16, "cuda")
    assert torch.equal(row_major(y), y) and not grids
