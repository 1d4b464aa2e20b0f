"""ModelConfig from HF configs (4.x and 5.x spellings) and load_weights' error handling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.models import SUPPORTED_ARCHITECTURES, ModelConfig, build_model, resolve_dtype
from engine.models.rotary import rope_inv_freq
from tests.engine.tiny_models import tiny_config


def test_fields_per_architecture() -> None:
    llama = ModelConfig.from_hf_config(tiny_config("llama"))
    assert (llama.architecture, llama.num_heads, llama.num_kv_heads, llama.head_dim) == ("LlamaForCausalLM", 4, 2, 16)
    assert (llama.qkv_bias, llama.o_bias, llama.qk_norm, llama.tie_word_embeddings) == (False, False, False, False)
    assert llama.max_model_len == 512 and llama.eos_token_ids == [258] and llama.torch_dtype == "float32"

    qwen2 = ModelConfig.from_hf_config(tiny_config("qwen2"))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm

    qwen3 = ModelConfig.from_hf_config(tiny_config("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.hidden_size == 64 and qwen3.num_heads == 8

    assert ModelConfig.from_hf_config(tiny_config("mqa")).num_kv_heads == 1
    assert ModelConfig.from_hf_config(tiny_config("tied")).tie_word_embeddings

    rope = ModelConfig.from_hf_config(tiny_config("llama3_rope"))
    assert rope.rope_type == "llama3" and rope.rope_scaling["factor"] == 8.0 and rope.rope_theta == 10000.0


def test_max_model_len_never_exceeds_a_used_sliding_window() -> None:
    assert ModelConfig.from_hf_config(tiny_config("mistral", sliding_window=128)).max_model_len == 128
    assert ModelConfig.from_hf_config(tiny_config("mistral", sliding_window=None)).max_model_len == 512
    # Qwen2 keeps a sliding_window value around but only uses it with use_sliding_window.
    off = tiny_config("qwen2", use_sliding_window=False)
    off.sliding_window = 64
    assert ModelConfig.from_hf_config(off).max_model_len == 512


def test_eos_ids_merge_config_and_generation_config() -> None:
    gen = SimpleNamespace(eos_token_id=[258, 7, 9])
    cfg = ModelConfig.from_hf_config(tiny_config("llama"), gen)
    assert cfg.eos_token_ids == [258, 7, 9]


def _old_style(**kw) -> SimpleNamespace:
    """A transformers-4.x-like config: rope_theta / rope_scaling, no rope_parameters."""
    base = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=500000.0, rope_scaling=None,
        torch_dtype="bfloat16", eos_token_id=[1, 2],
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_old_style_rope_attributes() -> None:
    cfg = ModelConfig.from_hf_config(_old_style(rope_scaling={"type": "linear", "factor": 4.0}))
    assert cfg.rope_theta == 500000.0 and cfg.rope_type == "linear" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.head_dim == 8 and cfg.torch_dtype == "bfloat16" and cfg.eos_token_ids == [1, 2]
    plain = ModelConfig.from_hf_config(_old_style())
    assert plain.rope_type == "default"
    torch.testing.assert_close(rope_inv_freq(8, 500000.0, cfg.rope_scaling), rope_inv_freq(8, 500000.0, {}) / 4)


def test_unsupported_things_raise_value_error_naming_alternatives() -> None:
    with pytest.raises(ValueError, match="supported: " + ", ".join(SUPPORTED_ARCHITECTURES)):
        ModelConfig.from_hf_config(_old_style(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*default, linear, llama3, yarn"):
        ModelConfig.from_hf_config(_old_style(rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf_config(_old_style(hidden_act="gelu"))
    with pytest.raises(ValueError, match="unknown floating dtype"):
        resolve_dtype("int8")


def _hf_state(cfg_name: str = "qwen2") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    hf_cfg = tiny_config(cfg_name)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    return ModelConfig.from_hf_config(hf_cfg), dict(hf.state_dict())


def test_load_weights_fills_fused_params_and_rejects_bad_checkpoints() -> None:
    cfg, state = _hf_state()
    model = build_model(cfg, "float32", "cpu")
    loaded = model.load_weights(state.items())
    assert loaded == set(state)
    layer = model.model.layers[1]
    q, k, v = (state[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.out_weight(), torch.cat([q, k, v]))
    gate, up = (state[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(layer.mlp.gate_up_proj.out_weight(), torch.cat([gate, up]))

    missing = {k: v for k, v in state.items() if "layers.0.self_attn.v_proj.bias" not in k}
    with pytest.raises(ValueError, match="lacks 1 parameter.*layers.0.self_attn.qkv_proj.bias"):
        build_model(cfg).load_weights(missing.items())
    with pytest.raises(ValueError, match="no matching parameter"):
        build_model(cfg).load_weights([*state.items(), ("model.layers.9.mlp.down_proj.weight", torch.zeros(1))])
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        build_model(cfg).load_weights(bad.items())


def test_tied_model_shares_one_matrix_and_casts_dtype() -> None:
    cfg, state = _hf_state("tied")
    assert "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    model = build_model(cfg, "bfloat16", "cpu")
    model.load_weights(state.items())
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names and not any("embed_tokens" in n for n in names)  # one matrix
    embed = state["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.table(), embed.to(torch.bfloat16))
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([3, 0, 319])
    assert torch.equal(model.model.embed_tokens(ids), embed[ids].to(torch.bfloat16))
    hidden = torch.randn(3, cfg.hidden_size, dtype=torch.bfloat16)
    assert model.compute_logits(hidden).dtype == torch.float32
