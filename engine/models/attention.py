"""Self-attention layer: fused QKV projection, optional q/k norm, RoPE, paged attention.

With ``ctx.fused_kernels`` the q/k norm and RoPE run as Triton kernels (``kernels/``).

The layer owns no cache: it hands q/k/v to ``ctx.backend`` together with its own layer's
slice of ``ctx.kv_cache``; the backend stores the new K/V and attends over the pages.
"""

from __future__ import annotations

import torch

from engine.forward_context import ForwardContext
from engine.models.config import ModelConfig
from engine.models.layers import Linear, RMSNorm
from engine.models.rotary import apply_rotary, rotate_qk


class Attention(torch.nn.Module):
    """Multi-head attention with grouped (or single) K/V heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = Linear(
            cfg.hidden_size,
            {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size},
            cfg.qkv_bias,
            dtype,
            device,
        )
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype, device)
        # Qwen3 normalises every q and k head (over head_dim) before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,  # (T, 1, D/2)
        sin: torch.Tensor,  # (T, 1, D/2)
        ctx: ForwardContext,
    ) -> torch.Tensor:  # (T, hidden)
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (H + 2 H_kv) * D)
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)  # (T, H, D)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)  # (T, H_kv, D)
        fused = ctx.fused_kernels
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q, fused=fused), self.k_norm(k, fused=fused)
        if self.q_norm is None and not fused:
            # q and k sit side by side in qkv: one rotation over all their heads is half the
            # elementwise ops of two (same values, bit for bit); a CPU decode step runs
            # hundreds of these small ops, each costing more in dispatch than in arithmetic.
            heads = self.num_heads + self.num_kv_heads
            qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, heads, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            if t > 1:  # one token: both views are contiguous already
                q, k = q.contiguous(), k.contiguous()
        else:
            q, k = rotate_qk(q, k, cos, sin, fused=fused)
        # q and k are fresh contiguous tensors; v is made contiguous too so every backend
        # (and the Triton store kernel) sees plain (T, H, D) tensors.
        v = v.contiguous()
        if torch.compiler.is_compiling():  # opaque to the compiler: see engine.models.compiled
            out = torch.ops.kvferry.attention(q, k, v, self.layer_idx, self.scale)
        else:
            out = ctx.backend.forward(
                q, k, v, ctx.kv_cache[self.layer_idx, 0], ctx.kv_cache[self.layer_idx, 1], ctx.attn_metadata, self.scale
            )  # (T, H, D)
        return self.o_proj(out.reshape(t, self.q_size))
