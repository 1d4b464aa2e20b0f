"""Our decoder vs transformers, per architecture: same logits over the paged KV cache.

Every step is built by hand (contiguous block tables, the torch backend) so these tests
pin the model alone, not the scheduler: a full prompt, a chunked continuation over the
cached prefix followed by decode steps, and a two-sequence batch mixing decode and prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tests.engine.tiny_models import ARCHS, load_hf_model, make_tiny_model

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata
from engine.forward_context import ForwardContext
from engine.loader import load_model
from engine.models.linear_setup import setup_cpu_linears

BLOCK_SIZE = 16
ATOL = 1e-4


@dataclass
class Seq:
    """One sequence's tokens and its contiguous blocks in the test cache."""

    token_ids: list[int]
    first_block: int
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)


def make_step(
    steps: list[tuple[Seq, int]], num_blocks_per_seq: int, kv_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
    """Build (input_ids, positions, ctx) for ``(seq, num_new_tokens)`` pairs; decodes (1 token) must come first."""
    ids, pos, slots = [], [], []
    decodes = [(s, n) for s, n in steps if n == 1 and s.num_computed > 0]
    prefills = steps[len(decodes) :]
    assert all(n > 1 or s.num_computed == 0 for s, n in prefills), "decodes must lead the batch"
    for s, n in steps:
        s.block_table = list(range(s.first_block, s.first_block + num_blocks_per_seq))
        for p in range(s.num_computed, s.num_computed + n):
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
    qlens = [n for _, n in prefills]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decode_tokens=len(decodes),
        decode_block_tables=torch.tensor([s.block_table for s, _ in decodes], dtype=torch.int32).view(len(decodes), num_blocks_per_seq),
        decode_context_lens=torch.tensor([s.num_computed + 1 for s, _ in decodes], dtype=torch.int32),
        decode_context_lens_list=[s.num_computed + 1 for s, _ in decodes],
        prefill_block_tables=torch.tensor([s.block_table for s, _ in prefills], dtype=torch.int32).view(len(prefills), num_blocks_per_seq),
        prefill_query_start_loc=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0).tolist()), dtype=torch.int32),
        prefill_context_lens=torch.tensor([s.num_computed + n for s, n in prefills], dtype=torch.int32),
        prefill_query_lens_list=qlens,
        prefill_context_lens_list=[s.num_computed + n for s, n in prefills],
        block_size=BLOCK_SIZE,
    )
    ctx = ForwardContext(
        kv_cache=kv_cache,
        attn_metadata=meta,
        backend=get_attention_backend("torch"),
        logits_indices=torch.arange(len(ids)),
    )
    for s, n in steps:
        s.num_computed += n
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64), ctx


def new_cache(cfg, num_blocks: int) -> torch.Tensor:
    # (num_layers, 2, num_blocks, block_size, H_kv, D); NaN so reading an unwritten slot shows.
    return torch.full(
        (cfg.num_layers, 2, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim), float("nan")
    )


# RoPE scalings beyond the ARCHS set: (name, base arch, config overrides).
ROPE_VARIANTS = {
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "qwen2_yarn_rope": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "rope_theta": 10000.0,
            }
        },
    ),
}


@pytest.fixture(scope="module", params=[*ARCHS, *ROPE_VARIANTS])
def tiny_path(request, tmp_path_factory):
    """A saved tiny model of one architecture."""
    arch, overrides = ROPE_VARIANTS.get(request.param, (request.param, {}))
    return make_tiny_model(arch, tmp_path_factory.mktemp(request.param), **overrides)


# CPU linears as loaded (F.linear) and prepacked for oneDNN.
@pytest.fixture(scope="module", params=["dense", "onednn"])
def pair(request, tiny_path):
    """(our model, its config, the HF reference) for one tiny architecture and linear kernel."""
    model, cfg = load_model(tiny_path)
    setup_cpu_linears(model, request.param, torch.device("cpu"))
    return model, cfg, load_hf_model(tiny_path)


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()  # (T, V)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (n,), generator=g).tolist()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@torch.inference_mode()
def test_full_prompt_matches_transformers(pair):
    model, cfg, hf = pair
    tokens = prompt(37, seed=1)  # crosses two block boundaries
    seq = Seq(tokens, first_block=1)  # block 0 stays NaN: a wrong table entry would poison the output
    ids, pos, ctx = make_step([(seq, len(tokens))], 3, new_cache(cfg, 4))
    logits = model.compute_logits(model(ids, pos, ctx))
    assert logits.dtype == torch.float32 and logits.shape == (37, cfg.vocab_size)
    assert_close(logits, hf_logits(hf, tokens))


@torch.inference_mode()
def test_chunked_prefill_then_decode_matches_transformers(pair):
    model, cfg, hf = pair
    tokens = prompt(36, seed=2)
    ref = hf_logits(hf, tokens)
    seq = Seq(tokens, first_block=0)
    cache = new_cache(cfg, 3)
    out = []
    for n in (20, 13, 1, 1, 1):  # prefill, a chunk over the cached prefix, then decodes
        ids, pos, ctx = make_step([(seq, n)], 3, cache)
        out.append(model.compute_logits(model(ids, pos, ctx)))
    assert_close(torch.cat(out), ref)


@torch.inference_mode()
def test_two_sequence_batch_matches_transformers(pair):
    model, cfg, hf = pair
    a, b = prompt(24, seed=3), prompt(17, seed=4)
    sa, sb = Seq(a, first_block=0), Seq(b, first_block=2)
    cache = new_cache(cfg, 4)
    # Step 1: both prefill in one flat batch (23 and 9 tokens, different lengths).
    ids, pos, ctx = make_step([(sa, 23), (sb, 9)], 2, cache)
    step1 = model.compute_logits(model(ids, pos, ctx))
    # Step 2: a mixed batch: A decodes its last token, B prefills the rest as a chunk.
    ids, pos, ctx = make_step([(sa, 1), (sb, 8)], 2, cache)
    step2 = model.compute_logits(model(ids, pos, ctx))
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    assert_close(step1[:23], ref_a[:23])
    assert_close(step1[23:], ref_b[:9])
    assert_close(step2[:1], ref_a[23:])
    assert_close(step2[1:], ref_b[9:])


@torch.inference_mode()
def test_bfloat16_forward_tracks_float32(tmp_path):
    """bf16 weights and activations (the GPU dtype) stay close to the fp32 model."""
    path = make_tiny_model("qwen3", tmp_path)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        model, cfg = load_model(path, dtype=dtype)
        cache = new_cache(cfg, 3).to(getattr(torch, dtype))
        ids, pos, ctx = make_step([(Seq(prompt(40, seed=5), first_block=0), 40)], 3, cache)
        logits[dtype] = model.compute_logits(model(ids, pos, ctx))
    assert logits["bfloat16"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(logits["bfloat16"], logits["float32"], dim=-1)
    assert cos.min() > 0.999, cos.min()
