"""Attention backends over the paged KV cache, selected by name."""

from __future__ import annotations

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.config import AttentionBackendName, PrefillAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def get_attention_backend(name: AttentionBackendName, *, prefill_attention: PrefillAttention = "auto") -> AttentionBackend:
    """Return the backend called ``name`` (``torch``, ``triton`` or ``flash_attn``).

    ``prefill_attention`` ("auto", "triton", "sdpa") picks the triton backend's prefill
    path; the other backends have a single prefill path and ignore it.
    """
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(prefill_attention=prefill_attention)
    if name == "flash_attn":
        from engine.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose torch, triton or flash_attn")
