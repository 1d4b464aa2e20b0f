"""The engine on a CUDA GPU with the Triton backend: parity with transformers, graphs vs eager.

Greedy decoding is checked *teacher-forced*: transformers recomputes the logits along the
engine's own token sequence and, at every generated position, the engine's logits must
be close to transformers' and its token must be transformers' argmax or within a hair of
it. Random tiny models have near-ties (top-2 gaps of 1e-3 happen), and the Triton kernels
run fp32 dots in TF32, so demanding identical greedy strings would test luck, not code;
a wrong KV slot, block table or padding row moves logits by tenths.

The decode batch shrinks step by step (requests of different lengths) and a request
joins mid-way, so decode-only steps replay graphs padded 6 -> 8, 5 -> 8, 3 -> 4 while
mixed steps run eagerly.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.cuda_graph import DecodeGraphRunner
from engine.loader import load_model
from tests.engine.test_cuda_graph import (
    BLOCK,
    random_decode_batch,
    random_kv_cache,
    reference_decode_hidden,
)
from tests.engine.tiny_models import load_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # Triton compiles and graph capture take seconds
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Generated tokens per request: the decode batch shrinks as requests finish.
MAX_TOKENS = (12, 10, 9, 7, 4, 3)
# Per dtype: max |logit difference| allowed, and how far below transformers' best logit
# the engine's greedy token may be (a near-tie resolved the other way).
TOLERANCE = {"float32": (2e-2, 2e-2), "bfloat16": (0.15, 0.1)}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (37, 5, 16, 23, 48, 9, 30)]


# Kernel choices checked against transformers: the defaults (torch norm/rope ops, SDPA for
# fresh prefills on CUDA) and every Triton kernel (fused norm/rope, the varlen prefill kernel).
KERNEL_CHOICES = {
    "default": {},
    "all-triton": {"fused_kernels": "on", "prefill_attention": "triton"},
}


def _run_engine(
    path, dtype: str, enforce_eager: bool, **options
) -> tuple[LLMEngine, dict[int, list[int]], dict[int, torch.Tensor]]:
    """Generate greedily; return the engine, tokens and the logits every sample saw, by request."""
    eng = LLMEngine.from_pretrained(
        str(path), device="cuda", dtype=dtype, attention_backend="triton", enforce_eager=enforce_eager,
        block_size=16, num_kv_blocks=128, max_num_seqs=16, **options,
    )
    logits_seen: dict[int, list[torch.Tensor]] = defaultdict(list)
    sample = eng.runner.sampler.sample

    def spy(logits, params, output_indices):  # the seed field tags requests (greedy ignores it)
        for row, p in zip(logits, params):
            logits_seen[p.seed].append(row.detach().float().cpu())
        return sample(logits, params, output_indices)

    eng.runner.sampler.sample = spy
    prompts = _prompts(0)
    late = len(prompts) - 1  # joins after a few decode steps: a mixed prefill + decode step
    for i, n in enumerate(MAX_TOKENS):
        eng.add_request(str(i), prompts[i], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, seed=i))
    tokens: dict[int, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                tokens[int(out.request_id)] = out.token_ids
        steps += 1
        if steps == 3:
            eng.add_request(str(late), prompts[late], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, seed=late))
    return eng, tokens, {k: torch.stack(v) for k, v in logits_seen.items()}


@torch.no_grad()
def _hf_logits(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """(len(generated), V) fp32: transformers' logits for each generated position, teacher-forced."""
    ids = torch.tensor([prompt + generated[:-1]], device="cuda")
    return hf(ids).logits[0, len(prompt) - 1 :].float().cpu()


def _check_against(ref: dict[int, torch.Tensor], tokens, logits, dtype: str) -> None:
    atol, tie = TOLERANCE[dtype]
    for i, toks in tokens.items():
        got, want = logits[i], ref[i]
        assert got.shape == want.shape, f"request {i}: {got.shape} logits rows vs {want.shape}"
        err = (got - want).abs().max().item()
        assert err < atol, f"request {i}: logits differ by {err:.4f} (allowed {atol})"
        best = want.max(dim=-1).values
        chosen = want.gather(1, torch.tensor(toks)[:, None])[:, 0]
        worst = (best - chosen).max().item()
        assert worst <= tie, f"request {i}: greedy token {worst:.4f} below the best logit"


@pytest.mark.parametrize("kernels", sorted(KERNEL_CHOICES))
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_parity_with_transformers(
    arch: str, dtype: str, enforce_eager: bool, kernels: str, tiny_model_dir
) -> None:
    path = tiny_model_dir(arch)
    eng, tokens, logits = _run_engine(path, dtype, enforce_eager, **KERNEL_CHOICES[kernels])
    assert eng.runner.fused_kernels is (kernels == "all-triton")
    assert eng.runner.backend.resolved_prefill_attention(torch.device("cuda")) == (
        "triton" if kernels == "all-triton" else "sdpa"
    )
    assert sorted(tokens) == list(range(len(MAX_TOKENS) + 1))
    assert [len(tokens[i]) for i in range(len(MAX_TOKENS))] == list(MAX_TOKENS)
    if enforce_eager:
        assert eng.runner.graph_runner is None
    else:
        graphs = eng.runner.graph_runner
        assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8, 16]
        assert graphs.num_replays >= 6  # decode-only steps at batch 6, 5, ... 1

    hf = load_hf_model(path).to(device="cuda", dtype=getattr(torch, dtype))
    prompts = _prompts(0)
    ref = {i: _hf_logits(hf, prompts[i], toks) for i, toks in tokens.items()}
    _check_against(ref, tokens, logits, dtype)
    if dtype == "bfloat16":
        # The first step (prefill, no graph involved) tracks transformers row by row.
        for i in tokens:
            cos = torch.nn.functional.cosine_similarity(logits[i][:1], ref[i][:1], dim=-1)
            assert cos.item() > 0.995, (i, cos.item())
    assert eng.pool.num_free_blocks == eng.pool.num_blocks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_matches_eager_engine(dtype: str, tiny_model_dir) -> None:
    """Same engine, graphs on and off: the same tokens and (almost) the same logits."""
    path = tiny_model_dir("llama")
    _, tok_graph, log_graph = _run_engine(path, dtype, enforce_eager=False)
    _, tok_eager, log_eager = _run_engine(path, dtype, enforce_eager=True)
    # Graph and eager steps differ only in padding and the decode grid's split count.
    atol = 1e-3 if dtype == "float32" else 0.1
    for i in tok_eager:
        first_diff = next((j for j, (a, b) in enumerate(zip(tok_graph[i], tok_eager[i])) if a != b), None)
        n = len(tok_eager[i]) if first_diff is None else first_diff + 1
        # Up to (and including) any divergence both saw the same prefix: logits must agree.
        torch.testing.assert_close(log_graph[i][:n], log_eager[i][:n], atol=atol, rtol=0)
        if first_diff is not None:  # only a near-tie may flip a token
            row = log_eager[i][first_diff]
            gap = (row.max() - row[tok_graph[i][first_diff]]).item()
            assert gap <= atol, f"request {i} diverged at {first_diff} by {gap:.4f}"


@torch.inference_mode()
def test_replay_equals_unpadded_eager_forward(tiny_model_dir) -> None:
    """Replayed graphs padded to 4, 8, 16 and 24 equal an unpadded torch-backend forward."""
    model, cfg = load_model(tiny_model_dir("qwen3"), dtype="float32", device="cuda")
    num_blocks, max_len = 512, 64
    kv = random_kv_cache(cfg, num_blocks, torch.float32, "cuda")
    runner = DecodeGraphRunner(model, kv, BLOCK, max_len, [1, 2, 4, 8, 16, 24])
    runner.capture(show_progress=False)
    assert torch.equal(kv, random_kv_cache(cfg, num_blocks, torch.float32, "cuda")), "capture wrote KV"
    for n, seed in ((3, 0), (5, 1), (13, 2), (24, 3), (3, 4)):
        batch = random_decode_batch(n, num_blocks, max_len // BLOCK, seed)
        before = kv.clone()
        got = runner.run(*batch).clone()  # (B_pad, hidden)
        ref_kv = before.clone()
        want = reference_decode_hidden(model, ref_kv, *batch)
        assert got.shape[0] == {3: 4, 5: 8, 13: 16, 24: 24}[n]
        # TF32 dots in the Triton decode kernel vs fp32 SDPA.
        torch.testing.assert_close(got[:n], want, atol=1e-2, rtol=1e-2)
        changed = (kv != before).flatten(3).any(-1)  # (L, 2, num_blocks, BLOCK)
        assert torch.equal(changed, (ref_kv != before).flatten(3).any(-1))
        assert int(changed.sum()) == n * cfg.num_layers * 2
    assert runner.num_replays == 5
