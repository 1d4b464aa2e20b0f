"""The attention-backend interface: how model layers reach paged KV.

A forward pass runs on a *flat* batch of ``T`` new tokens from several sequences. The
first ``num_decode_tokens`` tokens are decode tokens (one per decoding sequence); the
rest are prefill chunks, each sequence's tokens contiguous. A backend writes each new
token's K/V into its slot of the paged cache, then attends each query to its sequence's
cached context (which now includes the new tokens), causally.

KV layout, per layer: ``k_cache``/``v_cache`` of shape ``(num_blocks, block_size, H_kv, D)``;
token ``j`` of a sequence lives at ``block_table[j // block_size] * block_size + j % block_size``.
Backends: ``torch`` (SDPA, CPU default, ``engine.attention.torch_backend``) and the Triton
kernels of ``kernels/`` (``engine.attention.triton_backend``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where every new token's K/V goes and what every query attends to."""

    # (T,) int64: flat cache slot of each new token (block_id * block_size + offset).
    slot_mapping: torch.Tensor
    # Number of decode tokens at the head of the flat batch (== number of decode sequences).
    num_decode_tokens: int
    # (B_d, max_blocks_d) int32: block tables of the decode sequences, padded with 0.
    decode_block_tables: torch.Tensor
    # (B_d,) int32: context length of each decode sequence, new token included.
    decode_context_lens: torch.Tensor
    # Python copies of the decode lengths (so the torch backend never syncs on .item()).
    decode_context_lens_list: list[int]
    # (B_p, max_blocks_p) int32: block tables of the prefill sequences, padded with 0.
    prefill_block_tables: torch.Tensor
    # (B_p + 1,) int32: start of each prefill sequence's queries within the prefill part.
    prefill_query_start_loc: torch.Tensor
    # (B_p,) int32: context length of each prefill sequence after this chunk.
    prefill_context_lens: torch.Tensor
    # Python copies of the prefill query/context lengths.
    prefill_query_lens_list: list[int]
    prefill_context_lens_list: list[int]
    # Tokens per KV block.
    block_size: int

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_lens_list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and computes paged attention."""

    #: Name used in config (``attention_backend="torch"``).
    name: str = "abstract"

    @abstractmethod
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
        """Write ``k``/``v`` to their slots, then return causal attention output."""
