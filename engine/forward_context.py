"""What a model's forward pass needs besides token ids and positions.

The model runner builds one :class:`ForwardContext` per step; every attention layer
reads its own layer's K/V cache from ``kv_cache`` and calls ``backend.forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    """Per-step inputs shared by all layers."""

    # Paged KV of every layer: (num_layers, 2, num_blocks, block_size, H_kv, D); [l, 0] is K.
    kv_cache: torch.Tensor
    # Where new K/V go and what each query attends to.
    attn_metadata: AttentionMetadata
    # The attention implementation (torch SDPA, Triton, flash-attn).
    backend: AttentionBackend
    # (N,) int64: indices (into the flat batch) of the tokens whose logits are needed.
    logits_indices: torch.Tensor
    # Use the fused Triton residual+RMSNorm and rotary kernels (``kernels/``) instead of
    # the torch ops; resolved once per engine by ``ModelRunner``.
    fused_kernels: bool = False
