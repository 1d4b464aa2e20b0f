"""TritonAttentionBackend against TorchAttentionBackend on random mixed batches.

Both prefill paths are checked: the Triton kernel alone (``prefill_attention="triton"``)
and SDPA for fresh prefills with the kernel for prefills over a cached prefix (``"sdpa"``).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.attention import get_attention_backend, triton_backend
from engine.attention.base import AttentionMetadata
from engine.attention.sdpa_prefill import equal_length_runs
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend, prefill_runs
from engine.config import EngineConfig
from tests.kernels.kernel_test_inputs import random_block_tables

BS = 8
NUM_BLOCKS = 48


def _mixed_batch(case, decode_ctx: list[int], prefill: list[tuple[int, int]], h=4, h_kv=2, d=16):
    """Decode sequences (context incl. the new token) then prefill chunks (query, context).

    Caches hold noise where the earlier context lives; the backend writes the new tokens.
    """
    ctx_all = decode_ctx + [c for _, c in prefill]
    tables = random_block_tables(ctx_all, NUM_BLOCKS, BS, "cpu")
    nd = len(decode_ctx)
    slots = []
    for i, n in enumerate(decode_ctx):  # the decode token sits at position n - 1
        slots.append(int(tables[i, (n - 1) // BS]) * BS + (n - 1) % BS)
    for j, (qlen, c) in enumerate(prefill):
        for p in range(c - qlen, c):
            slots.append(int(tables[nd + j, p // BS]) * BS + p % BS)
    qlens = [q for q, _ in prefill]
    dev, dt = case.device, case.dtype
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        num_decode_tokens=nd,
        decode_block_tables=tables[:nd].to(dev),
        decode_context_lens=torch.tensor(decode_ctx, dtype=torch.int32, device=dev),
        decode_context_lens_list=list(decode_ctx),
        prefill_block_tables=tables[nd:].to(dev),
        prefill_query_start_loc=torch.tensor(
            [0, *torch.tensor(qlens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=dev
        ),
        prefill_context_lens=torch.tensor([c for _, c in prefill], dtype=torch.int32, device=dev),
        prefill_query_lens_list=qlens,
        prefill_context_lens_list=[c for _, c in prefill],
        block_size=BS,
    )
    t = len(slots)
    q = torch.randn(t, h, d, device=dev, dtype=dt)
    k = torch.randn(t, h_kv, d, device=dev, dtype=dt)
    v = torch.randn(t, h_kv, d, device=dev, dtype=dt)
    k_cache = torch.randn(NUM_BLOCKS, BS, h_kv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    return q, k, v, k_cache, v_cache, meta


def _compare(case, batch, backend=None):
    q, k, v, kc, vc, meta = batch
    scale = 1 / math.sqrt(q.shape[-1])
    kc_ref, vc_ref = kc.float(), vc.float()  # always copies: kc and vc are updated below
    if kc_ref.data_ptr() == kc.data_ptr():
        kc_ref, vc_ref = kc.clone(), vc.clone()
    got = (backend or TritonAttentionBackend()).forward(q, k, v, kc, vc, meta, scale)
    # The reference runs in fp32 so the comparison measures the kernels, not SDPA rounding.
    want = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), kc_ref, vc_ref, meta, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want, atol=case.atol, rtol=0)
    # Both wrote the new tokens' K/V into the same slots and nothing else.
    assert torch.equal(kc.float(), kc_ref) and torch.equal(vc.float(), vc_ref)


@pytest.mark.parametrize(
    "decode_ctx, prefill",
    [
        ([5, 17, 64, 1], [(9, 30), (1, 40), (70, 70)]),  # mixed: cached prefixes, a long chunk
        ([3, 150], []),  # decode only, one long context (split)
        ([], [(12, 12), (5, 29)]),  # prefill only
    ],
    ids=["mixed", "decode-only", "prefill-only"],
)
def test_matches_torch_backend(case, decode_ctx, prefill):
    _compare(case, _mixed_batch(case, decode_ctx, prefill))


def test_gqa_and_graph_bound(case):
    batch = _mixed_batch(case, [7, 33], [(4, 20)], h=8, h_kv=1)
    _compare(case, batch, TritonAttentionBackend(graph_max_context_len=256))


def test_registered_by_name():
    assert isinstance(get_attention_backend("triton"), TritonAttentionBackend)
    assert get_attention_backend("triton").name == "triton"


# --- prefill_attention: "sdpa" for fresh prefills, the kernel over cached prefixes ------


def _random_mix(seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Decode contexts and (query, context) prefills: fresh ones (some of equal length, so
    SDPA batches them) interleaved with chunks over a cached prefix."""
    rng = random.Random(seed)
    decode_ctx = [rng.randint(1, 40) for _ in range(rng.randint(0, 3))]
    prefill = []
    for _ in range(rng.randint(3, 6)):
        qlen = rng.choice([1, 7, 16, 16, rng.randint(1, 40)])
        cached = rng.choice([0, 0, rng.randint(1, 30)])
        prefill.append((qlen, qlen + cached))
    return decode_ctx, prefill


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdpa_prefill_matches_torch_backend(case, seed):
    decode_ctx, prefill = _random_mix(seed)
    _compare(case, _mixed_batch(case, decode_ctx, prefill), TritonAttentionBackend(prefill_attention="sdpa"))


@pytest.mark.parametrize(
    "decode_ctx, prefill",
    [
        # cached | fresh x3 (two of equal length: one batched SDPA call) | cached | fresh
        ([5, 17], [(9, 30), (12, 12), (12, 12), (5, 5), (1, 40), (70, 70)]),
        ([], [(16, 16), (16, 16), (16, 16)]),  # fresh only: no kernel launch at all
        ([4], [(6, 20), (3, 11)]),  # cached only: the kernel, as with "triton"
    ],
    ids=["interleaved", "fresh-only", "cached-only"],
)
def test_sdpa_prefill_fixed_mixes(case, decode_ctx, prefill):
    _compare(case, _mixed_batch(case, decode_ctx, prefill), TritonAttentionBackend(prefill_attention="sdpa"))


def test_sdpa_prefill_gqa(case):
    batch = _mixed_batch(case, [7], [(20, 20), (4, 20), (9, 9)], h=8, h_kv=1)
    _compare(case, batch, TritonAttentionBackend(prefill_attention="sdpa"))


def _count_kernel_prefill_calls(monkeypatch, backend, case, decode_ctx, prefill) -> list[list[int]]:
    """Run ``backend`` on a batch; return the context lengths each prefill-kernel launch got."""
    calls: list[list[int]] = []
    real = triton_backend.prefill_attention

    def spy(*args, **kwargs):
        calls.append(args[5].tolist())  # context_lens of the sequences this launch covers
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "prefill_attention", spy)
    q, k, v, kc, vc, meta = _mixed_batch(case, decode_ctx, prefill)
    backend.forward(q, k, v, kc, vc, meta, 0.25)
    return calls


def test_sdpa_sends_only_cached_prefix_runs_to_the_kernel(monkeypatch, case):
    prefill = [(9, 30), (4, 25), (12, 12), (12, 12), (1, 40), (70, 70)]
    calls = _count_kernel_prefill_calls(
        monkeypatch, TritonAttentionBackend(prefill_attention="sdpa"), case, [5], prefill
    )
    assert calls == [[30, 25], [40]]
    calls = _count_kernel_prefill_calls(
        monkeypatch, TritonAttentionBackend(prefill_attention="triton"), case, [5], prefill
    )
    assert calls == [[30, 25, 12, 12, 40, 70]]


def test_auto_resolves_to_sdpa_on_cuda_and_triton_elsewhere(monkeypatch, case):
    auto = TritonAttentionBackend()
    assert auto.prefill_attention == "auto"
    assert auto.resolved_prefill_attention(torch.device("cuda")) == "sdpa"
    assert auto.resolved_prefill_attention(torch.device("cuda", 0)) == "sdpa"
    assert auto.resolved_prefill_attention(torch.device("cpu")) == "triton"
    for choice in ("triton", "sdpa"):  # explicit choices hold on every device
        b = TritonAttentionBackend(prefill_attention=choice)
        assert {b.resolved_prefill_attention(torch.device(d)) for d in ("cpu", "cuda")} == {choice}
    # And "auto" on the CPU really runs the kernel for every prefill (the interpreter tests
    # keep exercising it), never SDPA.
    monkeypatch.setattr(triton_backend, "sdpa_fresh_prefill", lambda *a, **k: pytest.fail("SDPA on CPU"))
    if case.device == "cpu":
        calls = _count_kernel_prefill_calls(monkeypatch, auto, case, [3], [(8, 8), (2, 10)])
        assert calls == [[8, 10]]


def test_prefill_attention_choice_is_validated():
    # Validated once, by the engine's config; the backend receives only valid choices.
    with pytest.raises(ValueError, match="prefill_attention"):
        EngineConfig(attention_backend="triton", prefill_attention="flash")
    with pytest.raises(ValueError, match="prefill_attention"):
        EngineConfig(attention_backend="triton", prefill_attention="SDPA")
    cfg = EngineConfig(attention_backend="triton", prefill_attention="sdpa")
    assert get_attention_backend(cfg.attention_backend, prefill_attention=cfg.prefill_attention).prefill_attention == "sdpa"


def test_run_splitting():
    # (query, context): fresh when equal.
    assert prefill_runs([3, 3, 2, 5, 1], [3, 3, 9, 12, 1]) == [(0, 2, True), (2, 4, False), (4, 5, True)]
    assert prefill_runs([], []) == []
    # (first_row, num_seqs, seq_len): equal consecutive lengths share one SDPA call.
    assert equal_length_runs([4, 4, 4, 2, 4]) == [(0, 3, 4), (12, 1, 2), (14, 1, 4)]
