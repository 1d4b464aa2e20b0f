"""TritonAttentionBackend against TorchAttentionBackend on random mixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
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
