"""Zero the pruned entries of many tensors at once.

`MultiTensorMasker(masks).zero_pruned_(targets)` does `targets[i][~masks[i]] = 0` for every i. It is the whole
per-step cost of keeping a model sparse (`hf_tickets/enforce.py` calls it once for all gradients and once for all
weights per optimizer step), so on CUDA it aims at the memory floor of that job (it runs at 2.2x that floor on
an H200 for BERT-base at 90% sparsity, docs/benchmarks.md):

* **Bit-packed masks.** The masks are packed once, when the masker is built, into one int32 buffer on the device
  (bit j of word k of a tensor = element 32k + j kept), so a pass reads 1 bit per masked weight, not a byte.
* **One launch** for all tensors of one dtype, over a block table built at construction. Blocks whose mask keeps
  every element are left out of the table (nothing to write there; exactness tested in tests/test_kernels.py).
* **Zeros are stored, never multiplied in**, so a NaN or inf in a pruned entry becomes 0. Write policy: a block
  of 4- or 8-byte targets whose mask keeps at most REWRITE_KEPT_MAX_DENSITY of its entries is stored whole: the
  kernel loads its kept entries (a 32-byte sector with none is never read) and stores every entry, zeros where
  pruned and the loaded bits where kept, because predicated stores of the pruned entries alone leave partly
  written sectors, which made that form 1.8x slower in fp32 at 10% kept on an H200. Other blocks, and every block
  of 2-byte dtypes (no gain there), get a store of zeros predicated on each pruned entry: kept entries are neither
  read nor written. Loads and stores are untyped, so kept entries come back bit for bit, NaN payloads included
  (tests/test_kernels.py). `HF_TICKETS_STRICT_WRITES=1` makes every block write-only. The targets must not be
  written concurrently by another stream.
* **No per-step host-to-device copies.** Targets are addressed through a table of element offsets, cached on the
  device per (dtypes, data pointers), so the weights and the gradients each keep theirs. Under Trainer with
  `zero_grad(set_to_none=True)` the caching allocator handed the gradients the same addresses step after step
  (6 tables built over 15 `train()` calls of 40 steps in docs/benchmarks.md); a table is rebuilt (from pinned
  memory, non-blocking) only when the pointers change.

Elsewhere (CPU, no Triton, `HF_TICKETS_DISABLE_TRITON=1`, non-contiguous targets) it falls back to `masked_fill_`
per tensor, which writes zeros too.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheel has none.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _HAS_TRITON = False

WORD_BITS = 32  # mask bits per packed int32 word
BLOCK_WORDS = 256  # words per program: BLOCK = 8192 elements
BLOCK = BLOCK_WORDS * WORD_BITS
NUM_WARPS = 8
# Write policy (see the module docstring). A block of 4- or 8-byte targets is stored whole (kept entries re-stored
# with their own bits) when its mask keeps at most this fraction of its entries; otherwise, and for 2-byte dtypes,
# only the pruned entries are written. Measured on an H200, BERT-base-shaped fp32 tensors, ms per pass, write-only
# vs whole (docs/benchmarks.md): 2% kept 0.248 vs 0.135, 10% 0.300 vs 0.170, 20% 0.227 vs 0.179, 30% 0.184 vs
# 0.181, 50% 0.173 vs 0.182, 70% 0.164 vs 0.182; bf16 the same within 2% at every density.
# HF_TICKETS_STRICT_WRITES=1 makes every block write-only.
REWRITE_KEPT_MIN_BYTES = 4
REWRITE_KEPT_MAX_DENSITY = 0.25
TABLE_COLUMNS = 5  # tensor, first element, first mask word, elements left in the tensor, whole-block stores
_MISSING = object()
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
MAX_TABLES = 8  # cached offset tables per masker (weights, gradients, and a few spare for reallocations)

if _HAS_TRITON:

    @triton.jit
    def _zero_pruned_kernel(
        target_base,  # the first target: every target is addressed as an element offset from it
        target_offsets,  # int64 [tensors]: element offset of each target from target_base
        bits,  # int32: every mask, bit-packed, each tensor starting on a word
        blocks,  # int64 [programs, TABLE_COLUMNS]: see block_table
        WORDS: tl.constexpr,  # mask words per program (BLOCK = 32 * WORDS elements)
        REWRITE_KEPT: tl.constexpr,  # whole-block stores allowed for this dtype (then per block, as the table says)
    ):
        row = blocks + tl.program_id(0).to(tl.int64) * 5
        tensor = tl.load(row)
        start = tl.load(row + 1)
        word0 = tl.load(row + 2)
        left = tl.load(row + 3)
        base = target_base + (tl.load(target_offsets + tensor) + start)
        w = tl.arange(0, WORDS)
        b = tl.arange(0, 32)
        words = tl.load(bits + word0 + w, mask=w * 32 < left, other=-1)  # -1: all kept
        local = w[:, None] * 32 + b[None, :]
        keep = ((words[:, None] >> b[None, :]) & 1) != 0
        whole = False
        if REWRITE_KEPT:
            whole = tl.load(row + 4) != 0
        if whole:
            # Loads only the kept entries (a 32-byte sector with no kept entry is never read) and stores every
            # entry: zeros where pruned, the loaded bits where kept, so the memory system sees whole sectors.
            # Untyped loads and stores: kept entries, NaN payloads included, come back bit for bit.
            if left >= WORDS * 32:
                tl.store(base + local, tl.load(base + local, mask=keep, other=0))
            else:
                inside = local < left
                tl.store(base + local, tl.load(base + local, mask=keep & inside, other=0), mask=inside)
        else:
            # Write-only: a store of zeros predicated on each pruned entry; kept entries are neither read nor
            # written. Triton lays the tile out one element per thread along a row, so each warp instruction
            # covers 32 consecutive elements.
            pruned = (keep == 0) & (local < left)
            tl.store(base + local, tl.zeros([WORDS, 32], dtype=target_base.dtype.element_ty), mask=pruned)


def pack_mask_bits(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Pack bool masks (True = kept) into one int32 buffer on their device, and each mask's first word.

    Element e of mask i is bit (e % 32) of word `offsets[i] + e // 32`; the last word of a mask is padded with kept
    bits. Packed through bytes: byte k of a little-endian int32 holds its bits 8k..8k+7.
    """
    device = masks[0].device if masks else torch.device("cpu")
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    chunks, offsets, total = [], [], 0
    for mask in masks:
        flat = mask.reshape(-1)
        n_words = (flat.numel() + WORD_BITS - 1) // WORD_BITS
        padded = torch.ones(n_words * WORD_BITS, dtype=torch.bool, device=device)
        padded[: flat.numel()] = flat
        packed = (padded.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)
        chunks.append(packed.view(torch.int32))
        offsets.append(total)
        total += n_words
    words = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int32, device=device)
    if words.dtype != torch.int32:  # torch.cat of empty views
        words = words.view(torch.int32)
    return words, offsets


def unpack_mask_bits(words: torch.Tensor, offset: int, shape: Sequence[int]) -> torch.Tensor:
    """The bool mask of `shape` whose bits start at word `offset` (the inverse of `pack_mask_bits`, for tests)."""
    n = 1
    for size in shape:
        n *= size
    n_words = (n + WORD_BITS - 1) // WORD_BITS
    chunk = words[offset : offset + n_words].contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    bits = (chunk[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


def block_table(masks: Sequence[torch.Tensor], offsets: Sequence[int]) -> torch.Tensor:
    """int64 [blocks, TABLE_COLUMNS] on the CPU: (tensor, first element, first word, elements left in the tensor,
    whole-block stores) for every BLOCK of every mask that prunes at least one of its elements. Blocks that keep
    everything are left out (nothing to write there). The last column is 1 where the block keeps at most
    REWRITE_KEPT_MAX_DENSITY of its entries (the kernel then stores the whole block, for 4- and 8-byte dtypes)."""
    rows = []
    for i, (mask, offset) in enumerate(zip(masks, offsets)):
        n = mask.numel()
        if n == 0:
            continue
        n_blocks = (n + BLOCK - 1) // BLOCK
        padded = torch.ones(n_blocks * BLOCK, dtype=torch.bool, device=mask.device)
        padded[:n] = mask.reshape(-1)
        per_block = padded.view(n_blocks, BLOCK)
        starts = torch.arange(n_blocks, dtype=torch.int64) * BLOCK
        size = torch.clamp(n - starts, max=BLOCK)
        kept = per_block.sum(1).cpu() - (BLOCK - size)  # the padding counts as kept
        table = torch.stack(
            [
                torch.full_like(starts, i),
                starts,
                offset + starts // WORD_BITS,
                n - starts,
                (kept <= REWRITE_KEPT_MAX_DENSITY * size).to(torch.int64),
            ],
            dim=1,
        )
        rows.append(table[kept < size])
    return torch.cat(rows) if rows else torch.empty(0, TABLE_COLUMNS, dtype=torch.int64)


class MultiTensorMasker:
    """Zeroes the pruned entries of a fixed list of tensors shaped like `masks` (True = kept).

    On CUDA with Triton: one launch per call (per dtype, if the targets mix dtypes) over the bit-packed masks
    (the module docstring gives the write policy).
    Without the kernel (CPU, no Triton, non-contiguous targets) it writes zeros tensor by tensor with
    `masked_fill_`. Either way never a multiply, so a NaN or inf in a pruned entry is overwritten too.
    """

    def __init__(self, masks: Sequence[torch.Tensor]) -> None:
        self.masks = list(masks)
        self._pruned: Optional[list[torch.Tensor]] = None
        self._subsets: dict[tuple[int, ...], "MultiTensorMasker"] = {}
        self._shapes = [m.shape for m in self.masks]
        self.device = self.masks[0].device if self.masks else torch.device("cpu")
        self._device_index = self.device.index if self.device.index is not None else -1
        self.table_builds = 0  # offset tables built so far (the benchmark reports it: ideally 2, then none)
        self.launches = 0  # kernel launches so far
        # Strict write-only stores for every dtype (else only below REWRITE_KEPT_MIN_BYTES); read when built.
        self.rewrite_kept = os.environ.get("HF_TICKETS_STRICT_WRITES", "0") != "1"
        self.enabled = (
            _HAS_TRITON
            and os.environ.get("HF_TICKETS_DISABLE_TRITON", "0") != "1"  # to compare with the masked_fill_ path
            and self.device.type == "cuda"
            and all(m.device == self.device and m.dtype == torch.bool for m in self.masks)
        )
        if not self.enabled:
            return
        with torch.no_grad():
            self.bits, self.word_offsets = pack_mask_bits(self.masks)
            self.blocks = block_table(self.masks, self.word_offsets).to(self.device)
        self._grid = (self.blocks.shape[0],)
        self._tables: "OrderedDict[tuple, object]" = OrderedDict()

    def subset(self, indices: Sequence[int]) -> "MultiTensorMasker":
        """A masker for `masks[i] for i in indices` (cached), for when only some tensors have a gradient."""
        key = tuple(indices)
        if key not in self._subsets:
            sub = MultiTensorMasker([self.masks[i] for i in key])
            sub.rewrite_kept = self.rewrite_kept
            self._subsets[key] = sub
        return self._subsets[key]

    @torch.no_grad()
    def zero_pruned_(self, targets: Sequence[torch.Tensor]) -> None:
        """targets[i][~masks[i]] = 0 for every i: one launch on CUDA, else one masked_fill_ per tensor."""
        if len(targets) != len(self.masks):
            raise ValueError(f"got {len(targets)} tensors for {len(self.masks)} masks")
        if self.enabled and self._launch(targets):
            return
        if self._pruned is None:
            self._pruned = [~m for m in self.masks]
        for target, pruned in zip(targets, self._pruned):
            target.masked_fill_(pruned.to(target.device), 0)

    # ---- the kernel path ------------------------------------------------------------------------------------------

    def _launch(self, targets: Sequence[torch.Tensor]) -> bool:
        """The kernel path; False (nothing done) when the kernel can't serve these tensors.

        Host work per call (about 50 us for BERT-base's 74 tensors on the H200 machine): the cache key (every data
        pointer and dtype), a shape and contiguity check (so that the kernel never writes outside a target), and one
        launch.
        """
        if not targets:
            return True
        key = (tuple(map(_DTYPE, targets)), tuple(map(torch.Tensor.data_ptr, targets)))
        entry = self._tables.get(key, _MISSING)
        if entry is _MISSING:
            entry = self._tables[key] = self._build(targets)
            if len(self._tables) > MAX_TABLES:
                self._tables.popitem(last=False)
        elif not (all(map(torch.Tensor.is_contiguous, targets)) and list(map(_SHAPE, targets)) == self._shapes):
            return False  # the same addresses as a checked set, but other layouts: let the fallback handle them
        if entry is None:
            return False
        if type(entry) is list:  # mixed dtypes: one launch per dtype
            return all(self.subset(idx)._launch([targets[i] for i in idx]) for idx in entry)
        if not self._grid[0]:
            return True
        self.launches += 1
        offsets, rewrite_kept = entry
        _zero_pruned_kernel[self._grid](
            targets[0],
            offsets,
            self.bits,
            self.blocks,
            WORDS=BLOCK_WORDS,
            REWRITE_KEPT=rewrite_kept,
            num_warps=NUM_WARPS,
        )
        return True

    def _build(self, targets: Sequence[torch.Tensor]):
        """A cache entry for these targets: for one dtype (offsets on the device, whole-block stores allowed), for
        mixed dtypes a list of each dtype's indices, and None when the kernel can't serve them."""
        for t, shape in zip(targets, self._shapes):
            if t.shape != shape or not t.is_contiguous() or t.get_device() != self._device_index:
                return None
        dtype = targets[0].dtype
        if any(t.dtype != dtype for t in targets):
            groups: dict[torch.dtype, list[int]] = {}
            for i, t in enumerate(targets):
                groups.setdefault(t.dtype, []).append(i)
            return [tuple(idx) for idx in groups.values()]
        ptrs = [t.data_ptr() for t in targets]
        size = targets[0].element_size()
        if any((p - ptrs[0]) % size for p in ptrs):  # pragma: no cover - storage is element-aligned in practice
            return None
        self.table_builds += 1
        host = torch.tensor([(p - ptrs[0]) // size for p in ptrs], dtype=torch.int64, pin_memory=True)
        # The caching host allocator keeps `host` alive until this copy has run: no synchronization needed.
        return host.to(self.device, non_blocking=True), self.rewrite_kept and size >= REWRITE_KEPT_MIN_BYTES
