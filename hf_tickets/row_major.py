"""A row-major copy of a transposed activation, by a tiled transpose: `row_major(x)`.

cuSPARSELt hands back a 2:4 layer's output transposed in memory (a [tokens, features] tensor with strides
(1, tokens)), and the next 2:4 layer runs slower on that layout: on an H200 the MLP block's down projection ran
1.14x faster than dense on it and 1.49x on a row-major input (benchmarks/nm_mlp_kernels.py, docs/nm.md).
`x.contiguous()` does the layout change with PyTorch's elementwise copy, which reads or writes one side with a
stride and cost more than it saved there. The Triton kernel below moves 64 x 64 tiles through shared memory, so
both its reads and its writes are coalesced. Anything else (CPU, no Triton, other layouts) takes `x.contiguous()`.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheel has none.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _HAS_TRITON = False

TILE = 64
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension

if _HAS_TRITON:

    @triton.jit
    def _transpose_kernel(src, dst, ROWS, COLS, BLOCK: tl.constexpr):
        """dst[c, r] = src[r, c] for src [ROWS, COLS] and dst [COLS, ROWS], both row-major."""
        c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        r = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] < ROWS) & (c[None, :] < COLS)
        tile = tl.load(src + r[:, None] * COLS + c[None, :], mask=inside)
        tl.store(dst + c[:, None] * ROWS + r[None, :], tl.trans(tile), mask=tl.trans(inside))


def _transposed_2d(x: torch.Tensor) -> bool:
    """True when x, seen as [-1, features], is the transpose of a row-major [features, tokens] buffer."""
    if x.dim() < 2 or x.numel() == 0:
        return False
    try:
        x2d = x.view(-1, x.shape[-1])
    except RuntimeError:  # not expressible as one 2-D view
        return False
    tokens, features = x2d.shape
    return tokens > 1 and features > 1 and x2d.stride() == (1, tokens)


def row_major(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()`, with a tiled Triton transpose where x is a transposed 2-D layout on a CUDA device.

    The values are the same bit for bit either way (a copy, no arithmetic). `HF_TICKETS_DISABLE_TRITON=1` takes
    `x.contiguous()` everywhere.
    """
    if x.is_contiguous():
        return x
    if not (
        _HAS_TRITON and x.is_cuda and os.environ.get("HF_TICKETS_DISABLE_TRITON", "0") != "1" and _transposed_2d(x)
    ):
        return x.contiguous()
    src = x.view(-1, x.shape[-1]).t()  # row-major [features, tokens]
    rows, cols = src.shape
    grid = (triton.cdiv(cols, TILE), triton.cdiv(rows, TILE))
    if grid[1] > MAX_GRID_Y:  # pragma: no cover - more than 4M features
        return x.contiguous()
    out = torch.empty((cols, rows), dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _transpose_kernel[grid](src, out, rows, cols, BLOCK=TILE, num_warps=8)
    return out.view(x.shape)
