"""Model resolution, safetensors loading (single and sharded), GGUF conversion cache, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import gguf_cache
from engine.loader import (
    DEFAULT_MODEL_ID,
    default_gguf_path,
    load_model,
    resolve_model_path,
    safetensors_files,
    served_model_name,
)
from engine.tokenizer import PromptTokenizer, encode_chat, load_tokenizer
from tests.engine.tiny_models import CHAT_TEMPLATE, EOS_TOKEN_ID, load_hf_model, make_tiny_model


def test_sharded_and_single_file_load_identical_weights(tmp_path: Path) -> None:
    single = make_tiny_model("qwen2", tmp_path, subdir="single", seed=7)
    sharded = make_tiny_model("qwen2", tmp_path, subdir="sharded", seed=7, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    assert len(safetensors_files(sharded)) == len(set(index["weight_map"].values()))
    a, cfg_a = load_model(single)
    b, cfg_b = load_model(sharded)
    assert cfg_a == cfg_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_load_model_dtype_and_config(tmp_path: Path) -> None:
    path = make_tiny_model("qwen3", tmp_path)
    model, cfg = load_model(path, dtype="bfloat16")
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.eos_token_ids == [EOS_TOKEN_ID]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_resolve_model_path_accepts_dirs_and_rejects_the_rest(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path, with_tokenizer=False)
    assert resolve_model_path(str(path)) == path.resolve()
    with pytest.raises(ValueError, match="not found.*never downloads"):
        resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(empty))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no safetensors"):
        safetensors_files(empty)


def test_served_model_name() -> None:
    assert served_model_name("default") == DEFAULT_MODEL_ID == "SmolLM2-135M-Instruct"
    assert served_model_name("/models/Qwen3-0.6B/") == "Qwen3-0.6B"
    assert served_model_name("/models/foo.Q4_K_M.gguf") == "foo.Q4_K_M"


def test_tokenizer_chat_template(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path)
    tok = load_tokenizer(path)
    assert tok.chat_template == CHAT_TEMPLATE
    ids = encode_chat(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # a special token, not its bytes
    no_prompt = encode_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(tok, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_without_tokenizer_files_has_no_tokenizer(arch: str, tmp_path: Path) -> None:
    # transformers would happily build an empty Qwen2Tokenizer here; we refuse instead.
    path = make_tiny_model(arch, tmp_path, with_tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(path)


def test_gguf_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that dies halfway leaves no cache entry; the next call converts again."""
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"
    calls: list[Path] = []

    def crash(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf_cache, "convert_gguf", crash)
    with pytest.raises(ValueError, match="cannot convert tiny.gguf.*killed"):
        resolve_model_path(str(fake), cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    def ok(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(gguf_cache, "convert_gguf", ok)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(cache))  # the env var picks the cache root
    first = resolve_model_path(str(fake))
    assert first.parent == cache and first.name.startswith("tiny-") and len(calls) == 2
    assert resolve_model_path(str(fake)) == first and len(calls) == 2  # cached: no third call
    fake.write_bytes(b"GGUF changed")  # new content -> new key -> converted again
    assert resolve_model_path(str(fake)) != first and len(calls) == 3


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_path("default", cache_dir=tmp_path_factory.mktemp("kvferry-cache"))


@pytest.mark.slow
def test_default_gguf_converts_once_and_is_cached(default_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_gguf_path().is_file()
    assert default_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert gguf_cache.is_complete(default_dir)

    def must_not_run(src: Path, out: Path) -> None:
        raise AssertionError("converted again although the cache entry exists")

    monkeypatch.setattr(gguf_cache, "convert_gguf", must_not_run)
    assert resolve_model_path("default", cache_dir=default_dir.parent) == default_dir
    leftovers = [p for p in default_dir.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []

    tok = load_tokenizer(default_dir)
    assert tok.chat_template
    ids = encode_chat(tok, [{"role": "user", "content": "What is 2+2?"}])
    assert tok.decode(ids).rstrip().endswith("<|im_start|>assistant")


@pytest.mark.slow
@torch.inference_mode()
def test_default_model_matches_transformers(default_dir: Path) -> None:
    """The real SmolLM2 weights through our decoder give transformers' logits."""
    from tests.engine.test_models_parity import Seq, make_step, new_cache

    model, cfg = load_model(default_dir)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 9, 3, True)
    assert cfg.eos_token_ids == [2] and cfg.max_model_len == 8192
    tok = load_tokenizer(default_dir)
    tokens = encode_chat(tok, [{"role": "user", "content": "Name a colour."}])
    seq = Seq(tokens, first_block=0)
    nb = (len(tokens) + 15) // 16
    ids, pos, ctx = make_step([(seq, len(tokens))], nb, new_cache(cfg, nb))
    ours = model.compute_logits(model(ids, pos, ctx))
    ref = load_hf_model(default_dir)(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_cache_marks_become_token_counts_of_the_conversation_so_far(tmp_path: Path) -> None:
    """A breakpoint covers the tokens the whole prompt shares with the conversation cut at it
    (never the template's closing tokens, which the whole prompt has elsewhere)."""
    tok = PromptTokenizer(load_tokenizer(make_tiny_model("llama", tmp_path)), max_model_len=512)
    messages = [{"role": "system", "content": "You are terse. Answer in one word."},
                {"role": "user", "content": "Capital of France? And of Spain?"}]
    ids, counts = tok.encode_chat_with_marks(messages, [(0, len(messages[0]["content"])), (1, 18), (1, 33)])
    assert ids == tok.encode_chat(messages)
    system_only = tok.encode_chat(messages[:1], add_generation_prompt=False)
    # The system message's text is all shared; its closing <|im_end|> is shared too (the
    # whole prompt closes it the same way), so the count reaches the whole system turn.
    assert counts[0] == len(system_only)
    assert counts[0] < counts[1] < counts[2] < len(ids)
    assert tok.tokenizer.decode(ids[: counts[1]]).endswith("Capital of France?")
    with pytest.raises(ValueError, match="points at message 5"):
        tok.encode_chat_with_marks(messages, [(5, 1)])
