"""paged_decode (Triton, split over the context) against its reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.paged_decode import choose_num_splits, paged_decode, paged_decode_reference
from tests.kernels.kernel_test_inputs import random_block_tables, random_paged_cache

BS = 8  # KV block size: small so contexts cross many block boundaries


def _run(case, lens, h, h_kv, d=16, num_splits=None, max_context_len=None, num_blocks=64):
    kc, vc = random_paged_cache(case, num_blocks, BS, h_kv, d)
    tables = random_block_tables(lens, num_blocks, BS, case.device, pad_to=20)
    ctx = torch.tensor(lens, dtype=torch.int32, device=case.device)
    q = torch.randn(len(lens), h, d, device=case.device, dtype=case.dtype)
    scale = 1 / math.sqrt(d)
    out = paged_decode(
        q, kc, vc, tables, ctx, scale,
        num_splits=num_splits, max_context_len=max_context_len or max(lens),
    )
    ref = paged_decode_reference(q, kc, vc, tables, ctx, scale)
    return out, ref, (q, kc, vc, tables, ctx, scale)


@pytest.mark.parametrize("h, h_kv", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa8"])
def test_matches_reference_across_group_sizes(case, h, h_kv):
    out, ref, _ = _run(case, [1, 8, 9, 77], h, h_kv)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_split_context_gives_the_same_answer(case, num_splits):
    # 150 tokens in splits of whole 64-token tiles: the last split is short, one sequence
    # (length 5) leaves later splits empty, which the merge must ignore.
    out, ref, _ = _run(case, [150, 5, 64], 4, 2, num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


def test_reference_is_plain_attention(case):
    # Guard the reference itself: one sequence, softmax(q k^T * scale) v by hand.
    lens = [13]
    out, ref, (q, kc, vc, tables, _, scale) = _run(case, lens, 2, 1)
    nb = (13 + BS - 1) // BS
    keys = kc[tables[0, :nb].long()].flatten(0, 1)[:13, 0].float()  # (13, D)
    vals = vc[tables[0, :nb].long()].flatten(0, 1)[:13, 0].float()
    want = F.softmax(q[0].float() @ keys.T * scale, -1) @ vals  # (H, D)
    torch.testing.assert_close(out[0].float(), want, atol=case.atol, rtol=case.rtol)


def test_padded_graph_batch_uses_fixed_bound(case):
    # CUDA-graph style: grid sized from a fixed max_context_len far above the real lengths.
    out, ref, _ = _run(case, [3, 40], 4, 2, max_context_len=160)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


def test_short_contexts_in_a_grid_sized_for_a_long_bound(case):
    # CUDA graphs size the grid for max_model_len: 8 splits sized for 4096 tokens. Each
    # sequence's splits are sized from its own length (70 -> 2 splits of 64, 1 -> 1).
    out, ref, _ = _run(case, [70, 130, 1], 4, 2, num_splits=8, max_context_len=4096)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


def test_merge_walks_more_splits_than_one_tile(case):
    # 20 splits of 64 tokens: more than the merge kernel combines per iteration (16).
    out, ref, _ = _run(case, [64 * 20, 3], 2, 1, num_splits=20, num_blocks=170)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_context_gives_zeros_not_nan(case, num_splits):
    # A zero-length context has nothing to attend to: every split is empty, and the merge
    # must not compute exp2(-inf - -inf) = NaN. Its row is 0; the other row is unaffected.
    kc, vc = random_paged_cache(case, 64, BS, 2, 16)
    tables = random_block_tables([0, 150], 64, BS, case.device)
    ctx = torch.tensor([0, 150], dtype=torch.int32, device=case.device)
    q = torch.randn(2, 4, 16, device=case.device, dtype=case.dtype)
    out = paged_decode(q, kc, vc, tables, ctx, 0.25, num_splits=num_splits, max_context_len=150)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = paged_decode_reference(q[1:], kc, vc, tables[1:], ctx[1:], 0.25)
    torch.testing.assert_close(out[1:].float(), ref.float(), atol=case.atol, rtol=case.rtol)


def test_split_heuristic():
    assert choose_num_splits(64, 8, 1024) == 1  # a big batch fills the GPU already
    assert choose_num_splits(1, 8, 4096) == 16  # one long sequence: split it
    assert choose_num_splits(1, 8, 100) == 1  # too short to be worth merging


def test_bad_arguments_raise_value_error(case):
    _, _, (q, kc, vc, tables, ctx, scale) = _run(case, [5, 6], 4, 2)
    with pytest.raises(ValueError, match="context_lens has dtype"):
        paged_decode(q, kc, vc, tables, ctx.long(), scale)
    with pytest.raises(ValueError, match="block_tables has shape"):
        paged_decode(q, kc, vc, tables[:1], ctx, scale)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode(q[:, :3], kc, vc, tables, ctx, scale)
    with pytest.raises(ValueError, match="k_cache has dtype"):
        other = torch.float32 if q.dtype != torch.float32 else torch.float16
        paged_decode(q, kc.to(other), vc, tables, ctx, scale)
    with pytest.raises(ValueError, match="num_splits must be positive"):
        paged_decode(q, kc, vc, tables, ctx, scale, num_splits=0)
