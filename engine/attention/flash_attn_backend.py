"""flash-attn backend (``attention_backend="flash_attn"``), used only when flash_attn imports.

One ``flash_attn_varlen_func`` call per layer covers the whole flat batch: decode tokens
are sequences of query length 1, prefill chunks are the rest, and flash-attn's causal
mask is bottom-right aligned, which is exactly "the last Q positions of a C-token
context". flash-attn 2 reads paged K/V itself only when the page size is a multiple of
256; for the usual 16-token blocks we first gather each sequence's context into a packed
buffer (``kernels.paged_gather``). New K/V are stored with the Triton store kernel. The
step's ``cu_seqlens``, block table and gather slots are built once, at the first layer,
and reused by the others (every layer gets the same metadata object).

Importing this module without flash-attn raises ImportError with install instructions;
nothing else in kvferry requires flash-attn.
"""

from __future__ import annotations

import torch

try:
    from flash_attn import flash_attn_varlen_func
except ImportError as exc:  # flash-attn is optional and CUDA-only
    raise ImportError(
        "attention_backend='flash_attn' needs the flash-attn package "
        "(pip install flash-attn --no-build-isolation, on a CUDA machine); "
        "use attention_backend='triton' or 'torch' instead"
    ) from exc

from dataclasses import dataclass

from engine.attention.base import AttentionBackend, AttentionMetadata
from kernels.paged_gather import gather_varlen, varlen_slots
from kernels.store_kv import store_kv

# flash-attn 2 supports paged K/V (block_table=...) only for pages of a multiple of this.
FLASH_PAGE_MULTIPLE = 256


def _cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    """(B + 1,) int32 exclusive prefix sums, as flash-attn wants them."""
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _stack_tables(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two padded block tables of different widths (pad with block 0)."""
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]))
    return torch.cat([a, b]).to(torch.int32)


@dataclass
class _StepInputs:
    """What flash-attn needs for one step, the same for every layer."""

    common: dict  # cu_seqlens_q/k, max_seqlen_q/k, causal
    tables: torch.Tensor  # (B, max_blocks) int32, decode rows first
    slots: torch.Tensor | None  # (sum C,) int64 packed-gather slots; None when paged


class FlashAttnBackend(AttentionBackend):
    """flash-attn varlen attention over the paged cache (decode and prefill in one call)."""

    name = "flash_attn"

    def __init__(self) -> None:
        # (metadata, its inputs): the last step's, reused while the layers of a step run.
        self._step: tuple[AttentionMetadata, _StepInputs] | None = None

    def _step_inputs(self, meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepInputs:
        if self._step is not None and self._step[0] is meta:
            return self._step[1]
        nd = meta.num_decode_tokens
        query_lens = [1] * nd + list(meta.prefill_query_lens_list)
        context_lens = list(meta.decode_context_lens_list[:nd]) + list(meta.prefill_context_lens_list)
        tables = _stack_tables(meta.decode_block_tables[:nd], meta.prefill_block_tables)
        common = {
            "cu_seqlens_q": _cu_seqlens(query_lens, device),
            "cu_seqlens_k": _cu_seqlens(context_lens, device),
            "max_seqlen_q": max(query_lens),
            "max_seqlen_k": max(context_lens),
            "causal": True,
        }
        paged = block_size % FLASH_PAGE_MULTIPLE == 0
        inputs = _StepInputs(common, tables, None if paged else varlen_slots(tables, context_lens, block_size))
        self._step = (meta, inputs)
        return inputs

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, H_kv, D)
        v: torch.Tensor,  # (T, H_kv, D)
        k_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
        v_cache: torch.Tensor,  # (num_blocks, block_size, H_kv, D)
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (T, H, D)
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("flash_attn backend needs CUDA tensors in float16 or bfloat16")
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        step = self._step_inputs(meta, k_cache.shape[1], q.device)
        if step.slots is None:  # pages of a multiple of 256 tokens: flash-attn reads them itself
            return flash_attn_varlen_func(
                q, k_cache, v_cache, block_table=step.tables, softmax_scale=scale, **step.common
            )
        keys = gather_varlen(k_cache, step.slots)  # (sum C, H_kv, D)
        vals = gather_varlen(v_cache, step.slots)
        return flash_attn_varlen_func(q, keys, vals, softmax_scale=scale, **step.common)
