"""prefill_attention (Triton, varlen, cached prefix) against its reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.prefill_attention import prefill_attention, prefill_attention_reference
from tests.kernels.kernel_test_inputs import random_block_tables, random_paged_cache

BS = 8


def _run(case, query_lens, context_lens, h=4, h_kv=2, d=16):
    kc, vc = random_paged_cache(case, 64, BS, h_kv, d)
    tables = random_block_tables(context_lens, 64, BS, case.device)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    q = torch.randn(sum(query_lens), h, d, device=case.device, dtype=case.dtype)
    args = (q, kc, vc, tables, qsl.to(case.device), ctx.to(case.device), 1 / math.sqrt(d))
    out = prefill_attention(*args, max_query_len=max(query_lens))
    return out, prefill_attention_reference(*args), args


def test_varlen_batch_with_cached_prefixes(case):
    # Fresh prompt; 70 new tokens (two query tiles) after a 30-token cached prefix;
    # the last token only (fully cached prompt); a chunk ending mid-block.
    out, ref, _ = _run(case, [12, 70, 1, 9], [12, 100, 33, 20])
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


@pytest.mark.parametrize("h, h_kv", [(2, 2), (8, 1)], ids=["mha", "mqa8"])
def test_group_sizes(case, h, h_kv):
    out, ref, _ = _run(case, [5, 17], [21, 17], h=h, h_kv=h_kv)
    torch.testing.assert_close(out.float(), ref.float(), atol=case.atol, rtol=case.rtol)


def test_whole_prompt_equals_dense_causal_attention(case):
    # Independent of the reference: a fresh 19-token prompt is plain causal SDPA.
    out, _, (q, kc, vc, tables, _, _, scale) = _run(case, [19], [19], h=2, h_kv=2)
    nb = (19 + BS - 1) // BS
    keys = kc[tables[0, :nb].long()].flatten(0, 1)[:19].transpose(0, 1).float()
    vals = vc[tables[0, :nb].long()].flatten(0, 1)[:19].transpose(0, 1).float()
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), keys, vals, is_causal=True, scale=scale
    ).transpose(0, 1)
    torch.testing.assert_close(out.float(), want, atol=case.atol, rtol=case.rtol)


def test_bad_arguments_raise_value_error(case):
    _, _, (q, kc, vc, tables, qsl, ctx, scale) = _run(case, [3, 4], [3, 9])
    with pytest.raises(ValueError, match="query_start_loc has shape"):
        prefill_attention(q, kc, vc, tables, qsl[:2], ctx, scale)
    with pytest.raises(ValueError, match="context_lens has dtype"):
        prefill_attention(q, kc, vc, tables, qsl, ctx.long(), scale)
    with pytest.raises(ValueError, match="k_cache has shape"):
        prefill_attention(q, kc[..., :8], vc, tables, qsl, ctx, scale)
