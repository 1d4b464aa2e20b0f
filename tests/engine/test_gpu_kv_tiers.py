"""KV tiers on a CUDA GPU: demotions into pinned host rows on the side stream, promotions
back, and a disk round trip, each restoring the exact KV bytes and the same greedy tokens.

The reference is the same engine's device hit (same kernels, same KV bytes), not a
recompute: under TF32 a recomputed prefix may differ in the last bits, a copied one may not.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.block_hash import hash_prompt_blocks
from engine.outputs import TokensByTier
from tests.engine.test_engine_lifecycle import FakeClock

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BS = 16
HOUR = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, cache_ttl_s=3600.0)


def _prefix_kv(eng: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """(L, 2, n, bs, H, D) copy of the device blocks holding the prompt's cached prefix."""
    hashes = hash_prompt_blocks(prompt, BS, eng.model_id)[: (len(prompt) - 1) // BS]
    ids = [eng.pool._cached[h].block_id for h in hashes]
    return eng.runner.kv_cache[:, :, ids].clone()


def _settle(eng: LLMEngine) -> None:
    eng.step()
    assert eng.tiers.disk.flush()
    eng.step()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiers_round_trip_kv_bytes_and_tokens_on_cuda(dtype: str, tiny_model_dir, tmp_path: Path) -> None:
    rng = random.Random(3)
    prompt = [rng.randrange(3, 250) for _ in range(150)]
    want = (len(prompt) - 1) // BS * BS
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(
        str(tiny_model_dir("llama")), device="cuda", dtype=dtype, attention_backend="triton", clock=clock,
        block_size=BS, num_kv_blocks=64, host_kv_bytes=64 << 20, disk_kv_dir=str(tmp_path),
        device_ttl_s=60.0, host_ttl_s=120.0,
    )
    assert eng.tiers.host.storage.is_pinned()
    eng.generate([prompt], HOUR)
    (device,) = eng.generate([prompt], HOUR)
    assert device.cached_tokens_by_tier == TokensByTier(device=want)
    kv = _prefix_kv(eng, prompt)
    for tier, age in (("host", 61.0), ("disk", 121.0)):
        clock.now += age
        _settle(eng)
        (out,) = eng.generate([prompt], HOUR)
        assert out.cached_tokens_by_tier == TokensByTier(**{tier: want})
        assert out.token_ids == device.token_ids
        assert torch.equal(_prefix_kv(eng, prompt), kv)  # bit for bit, wherever the blocks landed
    s = eng.stats().tiers
    assert s.num_promoted_from_host and s.num_promoted_from_disk and not s.num_failed_promotions
    eng.close()
