"""The optional flash_attn backend: a clear ImportError without flash-attn, parity with it."""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch

HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(HAVE_FLASH_ATTN, reason="flash-attn is installed here")
def test_missing_flash_attn_gives_actionable_import_error():
    from engine.attention import get_attention_backend

    with pytest.raises(ImportError, match="pip install flash-attn.*'triton' or 'torch'"):
        importlib.import_module("engine.attention.flash_attn_backend")
    with pytest.raises(ImportError, match="flash-attn"):
        get_attention_backend("flash_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_FLASH_ATTN and torch.cuda.is_available()), reason="needs flash-attn and CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_backend_on_gpu(dtype, monkeypatch):
    from engine.attention.flash_attn_backend import FlashAttnBackend
    from engine.attention.torch_backend import TorchAttentionBackend
    from tests.kernels.kernel_test_inputs import Case
    from tests.kernels.test_triton_backend import _mixed_batch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case("cuda", dtype)
    q, k, v, kc, vc, meta = _mixed_batch(case, [5, 17, 64], [(9, 30), (70, 70)], h=8, h_kv=2, d=64)
    scale = 1 / math.sqrt(64)
    kc_ref, vc_ref = kc.float(), vc.float()
    got = FlashAttnBackend().forward(q, k, v, kc, vc, meta, scale)
    want = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), kc_ref, vc_ref, meta, scale)
    torch.testing.assert_close(got.float(), want, atol=case.atol, rtol=0)
