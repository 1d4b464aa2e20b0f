"""Test cases (device x dtype) and random paged-KV inputs shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Case:
    """Where and in which precision a kernel test runs."""

    device: str
    dtype: torch.dtype

    @property
    def atol(self) -> float:
        # Kernels keep fp32 accumulators but feed tl.dot half-precision probabilities.
        return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[self.dtype]


CASES = [
    pytest.param(Case("cpu", torch.float32), id="interp-fp32"),
    pytest.param(Case("cpu", torch.float16), id="interp-fp16"),
    pytest.param(Case("cuda", torch.bfloat16), id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param(Case("cuda", torch.float16), id="cuda-fp16", marks=pytest.mark.gpu),
]


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
