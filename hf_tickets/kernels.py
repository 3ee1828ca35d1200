"""Zero the pruned entries of many tensors at once.

Why a kernel: `torch._foreach_mul_(params, bool_masks)` mixes dtypes, so PyTorch runs its slow path, one `mul_`
per tensor; on BERT-base that is ~150 launches and ~1 ms of host time per optimizer step, which showed up as a
3% step-time overhead on an H100 (docs/benchmarks.md). On CUDA with Triton, `zero_pruned_` does the same work in
one launch and writes only the pruned entries (it never reads the values it keeps). Elsewhere it falls back to
the foreach multiply, which is exact too.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheel has none.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _HAS_TRITON = False

BLOCK = 4096

if _HAS_TRITON:

    @triton.jit
    def _zero_pruned_kernel(
        target_base, target_offsets, mask_base, mask_offsets, block_tensor, block_start, numels, BLOCK: tl.constexpr
    ):
        # One program zeroes the pruned entries of one BLOCK of one tensor. Tensors are addressed as element
        # offsets from the first tensor of the list, so a single launch covers every tensor.
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = tl.load(block_start + pid)
        n = tl.load(numels + t)
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        keep = tl.load(mask_base + tl.load(mask_offsets + t) + offs, mask=inside, other=1)
        target = target_base + tl.load(target_offsets + t) + offs
        tl.store(target, tl.zeros([BLOCK], dtype=target_base.dtype.element_ty), mask=inside & (keep == 0))


class MultiTensorMasker:
    """Cached launch tables for one fixed list of masks (the block layout depends only on their sizes)."""

    def __init__(self, masks: Sequence[torch.Tensor]) -> None:
        self.masks = list(masks)
        self.device = self.masks[0].device if self.masks else torch.device("cpu")
        self.enabled = (
            _HAS_TRITON
            and os.environ.get("HF_TICKETS_DISABLE_TRITON", "0") != "1"  # to compare with the foreach path
            and self.device.type == "cuda"
            and all(m.is_contiguous() for m in self.masks)
        )
        if not self.enabled:
            return
        numels = [m.numel() for m in self.masks]
        blocks = [(n + BLOCK - 1) // BLOCK for n in numels]
        self.block_tensor = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(blocks)).to(self.device)
        self.block_start = torch.cat([torch.arange(b, dtype=torch.int64) * BLOCK for b in blocks]).to(self.device)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=self.device)
        self.mask_bytes = [m.view(torch.uint8) for m in self.masks]
        self.mask_offsets = self._offsets(self.mask_bytes)
        self._target_ptrs: Optional[tuple[int, ...]] = None
        self._target_offsets: Optional[torch.Tensor] = None

    def _offsets(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        base, size = tensors[0].data_ptr(), tensors[0].element_size()
        return torch.tensor([(t.data_ptr() - base) // size for t in tensors], dtype=torch.int64).to(
            self.device, non_blocking=True
        )

    def _usable_for(self, targets: Sequence[torch.Tensor]) -> bool:
        if not self.enabled or len(targets) != len(self.masks):
            return False
        dtype, size = targets[0].dtype, targets[0].element_size()
        base = targets[0].data_ptr()
        return all(
            t.dtype == dtype
            and t.device == self.device
            and t.is_contiguous()
            and t.shape == m.shape
            and (t.data_ptr() - base) % size == 0
            for t, m in zip(targets, self.masks)
        )

    def zero_pruned_(self, targets: Sequence[torch.Tensor]) -> bool:
        """targets[i][~masks[i]] = 0 for every i in one launch; False (nothing done) when the kernel can't serve."""
        if not self.enabled:
            return False
        ptrs = tuple(t.data_ptr() for t in targets)
        if ptrs != self._target_ptrs:  # weights keep their storage; gradients may be reallocated every step
            if not self._usable_for(targets):
                return False
            self._target_offsets = self._offsets(targets)
            self._target_ptrs = ptrs
        grid = (self.block_tensor.numel(),)
        _zero_pruned_kernel[grid](
            targets[0],
            self._target_offsets,
            self.mask_bytes[0],
            self.mask_offsets,
            self.block_tensor,
            self.block_start,
            self.numels,
            BLOCK=BLOCK,
        )
        return True


@torch.no_grad()
def zero_pruned_(
    targets: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], masker: Optional[MultiTensorMasker]
) -> None:
    """Zero `targets[i]` where `masks[i]` is False: one Triton launch when possible, else one foreach call."""
    if not targets:
        return
    if masker is None or not masker.zero_pruned_(targets):
        torch._foreach_mul_(list(targets), list(masks))
