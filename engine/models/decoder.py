"""One generic pre-norm decoder for Llama, Mistral, Qwen2 and Qwen3 (flags in ModelConfig).

Module names mirror transformers' (``model.layers.N.self_attn...``) so checkpoint names map
one-to-one, except the fused ``qkv_proj`` and ``gate_up_proj`` which ``load_weights``
fills shard by shard.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from engine.forward_context import ForwardContext
from engine.models.attention import Attention
from engine.models.config import ModelConfig
from engine.models.cpu_linear import LinearKernel
from engine.models.layers import Embedding, Linear, RMSNorm, SwiGLUMLP
from engine.models.rotary import RotaryEmbedding

# HF projection name -> (our fused module name, shard name inside it).
_FUSED = {
    "q_proj": ("qkv_proj", "q_proj"),
    "k_proj": ("qkv_proj", "k_proj"),
    "v_proj": ("qkv_proj", "v_proj"),
    "gate_proj": ("gate_up_proj", "gate_proj"),
    "up_proj": ("gate_up_proj", "up_proj"),
}
_FUSED_RE = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
# Checkpoint entries that carry no parameters of ours (old exports saved RoPE buffers).
_IGNORED_RE = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.cos_cached|rotary_emb\.sin_cached)$")


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, residual adds fused into the norms."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, dtype, device)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden): previous sub-layer output, not yet added
        residual: torch.Tensor,  # (T, hidden): the residual stream, updated in place
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = ctx.fused_kernels
        x, residual = self.input_layernorm.add_and_norm(hidden, residual, fused=fused)
        x = self.self_attn(x, cos, sin, ctx)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual, fused=fused)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, the layer stack and the final norm (HF's ``model.``)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        residual = self.embed_tokens(input_ids)  # (T, hidden), fresh: ours to mutate
        cos, sin = self.rotary_emb.cos_sin(positions, residual.dtype)  # (T, 1, D/2) each
        # The first layer's "previous output" is zero, so its add_and_norm just normalises.
        hidden = torch.zeros_like(residual)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, ctx)
        if ctx.fused_kernels:
            return self.norm.add_and_norm(hidden, residual, fused=True)[0]
        residual.add_(hidden)
        return self.norm(residual)


class DecoderForCausalLM(nn.Module):
    """The model the engine runs: ``forward`` -> hidden states, ``compute_logits`` -> fp32 logits."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, dtype, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        if cfg.tie_word_embeddings:
            self.model.embed_tokens.tie_to(self.lm_head)  # one matrix, loaded once

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        ctx: ForwardContext,
    ) -> torch.Tensor:  # (T, hidden)
        if input_ids.dim() != 1 or input_ids.shape != positions.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must be equal (T,)")
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, hidden) -> (N, vocab) fp32
        return self.lm_head(hidden).float()

    def linears(self) -> list[Linear]:
        """Every linear layer, the lm_head last."""
        return [m for m in self.modules() if isinstance(m, Linear) and m is not self.lm_head] + [self.lm_head]

    @torch.no_grad()
    def use_linear_kernels(self, kinds: dict[Linear, LinearKernel], packed: dict[int, torch.Tensor] | None = None) -> None:
        """Re-store each linear's weight for its kernel (``engine.models.cpu_linear``).

        ``packed`` maps ``id(weight)`` to a oneDNN copy made already (by the calibration).
        A tied embedding keeps the dense matrix when the lm_head packs its own.
        """
        packed = packed or {}
        embed = self.model.embed_tokens
        if embed.tied_head is not None and kinds.get(self.lm_head) == "onednn":
            embed.keep_table()
        for module, kind in kinds.items():
            module.use_kernel(kind, packed.get(id(module.weight)))

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy HF-named tensors into our (fused, possibly transposed) parameters.

        Returns the HF names consumed. With ``strict`` (the default) every parameter must
        be fully covered by the end, else ``ValueError`` lists what the checkpoint lacks.
        Unknown names are an error too: silently dropping a tensor would give a model that
        runs but talks nonsense.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        tied = self.config.tie_word_embeddings
        covered: dict[str, int] = {}  # our param name -> elements written so far
        loaded: set[str] = set()
        for name, tensor in weights:
            if _IGNORED_RE.search(name):
                continue
            if tied and name == "lm_head.weight":
                continue  # some exports save the tied matrix twice; the embedding copy wins
            if tied and name == "model.embed_tokens.weight":
                name_ours, module, shard, kind = "lm_head.weight", self.lm_head, "", "weight"
            elif m := _FUSED_RE.match(name):
                prefix, proj, kind = m.groups()
                fused, shard = _FUSED[proj]
                name_ours, module = f"{prefix}.{fused}.{kind}", modules.get(f"{prefix}.{fused}")
            else:
                prefix, _, kind = name.rpartition(".")
                name_ours, module, shard = name, modules.get(prefix), ""
            if name_ours not in params or module is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            try:
                if isinstance(module, Linear):
                    n = module.load(shard, kind, tensor)
                else:
                    n = _copy(params[name_ours], tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            covered[name_ours] = covered.get(name_ours, 0) + n
            loaded.add(name)
        if strict:
            missing = [n for n, p in params.items() if covered.get(n, 0) < p.numel()]
            if missing:
                shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
                raise ValueError(f"checkpoint lacks {len(missing)} parameter(s): {shown}")
        return loaded


def _copy(dst: torch.Tensor, src: torch.Tensor) -> int:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)  # casts dtype and moves device
    return dst.numel()
