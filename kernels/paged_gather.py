"""Gather the paged K/V of several sequences into one packed, varlen buffer.

Dense varlen attention APIs (flash-attn's ``flash_attn_varlen_func`` with pages smaller
than it supports) want each sequence's keys contiguous, sequences back to back, addressed
by ``cu_seqlens``. Pure torch: one fancy-index gather per cache, no host sync when the
lengths are given as a host list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def varlen_slots(
    block_tables: torch.Tensor,  # (B, max_blocks) int32/int64
    context_lens: Sequence[int],  # B host-side lengths
    block_size: int,
) -> torch.Tensor:  # (sum(context_lens),) int64 flat cache slots
    """Flat cache slot of every context token, sequence after sequence."""
    if block_tables.dim() != 2 or block_tables.shape[0] != len(context_lens):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} does not match {len(context_lens)} lengths"
        )
    if any(n < 0 or n > block_tables.shape[1] * block_size for n in context_lens):
        raise ValueError(f"a context length exceeds its block table: {list(context_lens)}")
    device = block_tables.device
    lens = torch.tensor(list(context_lens), dtype=torch.int64, device=device)
    total = int(sum(context_lens))
    # output_size: without it repeat_interleave reads the total back from the device (a sync).
    seq = torch.repeat_interleave(torch.arange(len(context_lens), device=device), lens, output_size=total)  # (N,)
    starts = torch.cumsum(lens, 0) - lens  # (B,) exclusive prefix sums
    pos = torch.arange(total, device=device) - starts[seq]  # (N,) position within its sequence
    blocks = block_tables.long()[seq, pos // block_size]
    return blocks * block_size + pos % block_size


def gather_varlen(
    cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
    slots: torch.Tensor,  # (N,) int64 from varlen_slots
) -> torch.Tensor:  # (N, H_kv, D)
    """Rows ``slots`` of the flattened cache."""
    nb, bs, h_kv, d = cache.shape
    return cache.reshape(nb * bs, h_kv, d)[slots]
