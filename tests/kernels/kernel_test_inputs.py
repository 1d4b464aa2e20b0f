"""Random paged-KV fixtures shared by the attention kernel tests (not a test module)."""

from __future__ import annotations

import torch


def random_paged_cache(case, num_blocks: int, block_size: int, h_kv: int, d: int):
    """K and V caches filled with noise (unused slots too: a kernel reading them shows)."""
    shape = (num_blocks, block_size, h_kv, d)
    return (
        torch.randn(shape, device=case.device, dtype=case.dtype),
        torch.randn(shape, device=case.device, dtype=case.dtype),
    )


def random_block_tables(
    context_lens: list[int], num_blocks: int, block_size: int, device: str, pad_to: int | None = None
) -> torch.Tensor:
    """(B, max_blocks) int32 tables of distinct, shuffled blocks, padded with 0."""
    need = [(n + block_size - 1) // block_size for n in context_lens]
    width = max(max(need), pad_to or 0)
    if sum(need) > num_blocks:
        raise ValueError("not enough blocks for these contexts")
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n]
        used += n
    return tables.to(device)
