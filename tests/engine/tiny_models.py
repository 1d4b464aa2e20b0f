"""Tiny random Hugging Face models (and a byte-level tokenizer) saved to disk for tests.

``make_tiny_model("qwen3", tmp_path)`` writes a real HF checkpoint directory (config.json,
safetensors, generation_config.json, tokenizer files with a ChatML chat template) that both
transformers and ``engine.loader`` read. Weights are random but *all* of them, biases and
norm scales included, are perturbed away from HF's init (zeros / ones), so a weight that
loads into the wrong place changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3", "mqa", "tied", "untied")

# The tokenizer: 256 byte-level symbols + these specials (ids 256, 257, 258).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 258
VOCAB_SIZE = 320  # > 259 so some ids are never produced by the tokenizer, like real models
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": 0,
}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config of a tiny ``arch`` model (see ARCHS)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kw = dict(_COMMON)
    if arch in ("llama", "untied"):
        cls = LlamaConfig
    elif arch == "tied":
        cls, kw["tie_word_embeddings"] = LlamaConfig, True
    elif arch == "mqa":
        cls, kw["num_key_value_heads"] = LlamaConfig, 1
    elif arch == "llama3_rope":
        cls = LlamaConfig
        # Short original context so every RoPE regime (kept, blended, scaled) occurs at D=16.
        kw["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        kw["num_hidden_layers"] = 3
    elif arch == "mistral":
        cls, kw["sliding_window"] = MistralConfig, 256
    elif arch == "qwen2":
        cls = Qwen2Config
    elif arch == "qwen3":
        # Explicit head_dim != hidden / heads, and 4 layers with GQA 4:1.
        cls = Qwen3Config
        kw.update(head_dim=32, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    kw.update(overrides)
    return cls(**kw)


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer without merges: any text round-trips, 259 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0],
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(
    arch: str,
    tmp_path: Path,
    *,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    subdir: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``arch`` model under ``tmp_path/<subdir or arch>`` and return the dir.

    ``overrides`` go to the HF config; ``max_shard_size`` (e.g. ``"20KB"``) saves a sharded
    checkpoint with ``model.safetensors.index.json``.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    _perturb(model)
    out = Path(tmp_path) / (subdir or arch)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        make_tokenizer().save_pretrained(out)
    return out


@torch.no_grad()
def _perturb(model: torch.nn.Module) -> None:
    """Move every weight off HF's init so misplaced weights are visible in the logits."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(0.08 * torch.randn_like(p))


def load_hf_model(path: Path) -> Any:
    """The transformers reference model from a tiny-model dir (fp32, eval, eager-free SDPA)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
