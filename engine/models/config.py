"""``ModelConfig``: everything the engine needs to know about a decoder-only model.

Built from a Hugging Face config (``from_hf_config``) so the rest of the engine never
touches transformers' config classes, whose attribute names drift between releases
(``rope_theta``/``rope_scaling`` in 4.x, ``rope_parameters`` in 5.x; ``torch_dtype``
vs ``dtype``). All the version juggling lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# HF architecture name -> the flags that distinguish it inside the one generic decoder.
# qkv_bias / qk_norm defaults; a config's own ``attention_bias`` still wins where the
# architecture reads it (Llama, Mistral, Qwen3).
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
}

# Configs built in code (``LlamaConfig(...)``) have no ``architectures`` list yet.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

#: RoPE variants implemented by ``engine.models.rotary``.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Shape and numerics of a supported decoder-only transformer."""

    # HF architecture name, one of SUPPORTED_ARCHITECTURES.
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    # Query heads and key/value heads (num_kv_heads < num_heads: GQA; == 1: MQA).
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # RoPE scaling parameters with at least "rope_type" ("default" when unscaled).
    rope_scaling: dict[str, Any]
    tie_word_embeddings: bool
    # Bias on the q/k/v projections (Qwen2), on o_proj, and on the MLP projections.
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Per-head RMSNorm on q and k before RoPE (Qwen3).
    qk_norm: bool
    # Longest sequence (prompt + generated) the engine may run; never above a sliding
    # window, since we do not implement sliding-window attention.
    max_model_len: int
    # Token ids that end generation (config and generation_config merged, order kept).
    eos_token_ids: list[int] = field(default_factory=list)
    # The checkpoint's dtype as a torch attribute name ("float32", "bfloat16", ...).
    torch_dtype: str = "float32"
    bos_token_id: int | None = None

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling.get("rope_type", "default"))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: Any, generation_config: Any | None = None) -> ModelConfig:
        """Build from a transformers ``PretrainedConfig`` (4.x or 5.x) and optional ``GenerationConfig``."""
        arch = _architecture(cfg)
        flags = SUPPORTED_ARCHITECTURES[arch]
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{arch}: hidden_act={act!r} is not supported (only silu)")
        if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise ValueError(f"{arch}: partial_rotary_factor != 1 is not supported")
        num_heads = int(cfg.num_attention_heads)
        num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_parameters(cfg)
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        # Qwen2 always has q/k/v bias and never an o_proj bias; the others follow attention_bias.
        qkv_bias = flags["qkv_bias"] or attention_bias
        o_bias = attention_bias and arch != "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            num_layers=int(cfg.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            intermediate_size=int(cfg.intermediate_size),
            rms_norm_eps=float(cfg.rms_norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=flags["qk_norm"],
            max_model_len=_max_model_len(cfg),
            eos_token_ids=_eos_token_ids(cfg, generation_config),
            torch_dtype=_dtype_name(cfg),
            bos_token_id=getattr(cfg, "bos_token_id", None),
        )


def _architecture(cfg: Any) -> str:
    archs = list(getattr(cfg, "architectures", None) or [])
    if not archs and getattr(cfg, "model_type", None) in _MODEL_TYPE_TO_ARCH:
        archs = [_MODEL_TYPE_TO_ARCH[cfg.model_type]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"unsupported model architecture {archs or getattr(cfg, 'model_type', None)!r}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_parameters(cfg: Any) -> tuple[float, dict[str, Any]]:
    """Return (theta, scaling dict with "rope_type") from a 4.x or 5.x config."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # 5.x models with several layer types keep one dict per type; we only run full attention.
        params = params.get("full_attention")
    if isinstance(params, dict) and params:
        scaling = dict(params)
    else:  # transformers 4.x: theta and scaling are separate attributes.
        scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = getattr(cfg, "rope_theta", None) or 10000.0
    # Old configs spell it "type"; "mrope"/"default" variants are the unscaled RoPE.
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "yarn":
        # DeepSeek-style configs leave factor out: it is then the context extension ratio.
        scaling.setdefault("original_max_position_embeddings", getattr(cfg, "max_position_embeddings", None))
        if scaling.get("factor") is None:
            scaling["factor"] = cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(theta), scaling


def _max_model_len(cfg: Any) -> int:
    limit: float = float(getattr(cfg, "max_position_embeddings", None) or math.inf)
    window = getattr(cfg, "sliding_window", None)
    # Qwen2/3 carry a sliding_window value but only use it when use_sliding_window is set.
    if window and getattr(cfg, "use_sliding_window", True):
        limit = min(limit, float(window))
    if math.isinf(limit):
        raise ValueError("config has neither max_position_embeddings nor sliding_window")
    return int(limit)


def _eos_token_ids(cfg: Any, generation_config: Any | None) -> list[int]:
    ids: list[int] = []
    for src in (cfg, generation_config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        for tok in [eos] if isinstance(eos, int) else list(eos or []):
            if tok is not None and int(tok) not in ids:
                ids.append(int(tok))
    return ids


def _dtype_name(cfg: Any) -> str:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    name = str(dt).removeprefix("torch.")
    return name if name != "auto" else "float32"
