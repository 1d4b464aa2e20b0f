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

    @property
    def rtol(self) -> float:
        # Half-precision outputs are rounded once by the kernel and once by the reference:
        # they may land one ulp apart (bf16: 2^-7 relative), which a fixed atol cannot cover
        # for outputs of magnitude 2 and more.
        return {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}[self.dtype]


def interpreter_usable() -> bool:
    """Whether Triton's interpreter can run kernels in this process.

    Triton's standard library (``tl.zeros``, ``tl.cdiv``, ``tl.max``...) is wrapped for the
    interpreter only if ``TRITON_INTERPRET=1`` was set when triton was first imported; the
    conftest sets it only on machines without CUDA. On a GPU machine the interpreted cases
    would fail with "Cannot call @triton.jit'd outside of the scope of a kernel", so they
    are skipped there (the compiled cuda cases cover the kernels).
    """
    try:
        import triton.language as tl
    except ImportError:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


# For tests that run kernels interpreted outside the `case` fixture (engine parity runs...).
NEEDS_INTERPRETER = pytest.mark.skipif(
    not interpreter_usable(), reason="triton was imported without TRITON_INTERPRET=1 (GPU machine)"
)

CASES = [
    pytest.param(Case("cpu", torch.float32), id="interp-fp32", marks=NEEDS_INTERPRETER),
    pytest.param(Case("cpu", torch.float16), id="interp-fp16", marks=NEEDS_INTERPRETER),
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
