"""KV tiers in the whole engine: greedy tokens identical whether a prefix came from the
device, host memory, disk or recompute (every tiny architecture); the disk tier across an
engine restart, fingerprint mismatches and corrupt files; other requests keep running
while one waits for its promotion."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.block_hash import hash_prompt_blocks
from engine.kv_events import BlockStored, Tier
from engine.kv_tiers.block_file import block_path
from engine.kv_tiers.disk_tier import DiskTier
from engine.outputs import RemotePrefillPlan, TokensByTier
from engine.request import RequestStatus
from tests.engine.conftest import hf_greedy
from tests.engine.test_engine_lifecycle import FakeClock
from tests.engine.tiny_models import ARCHS, load_hf_model

BS = 4
NEW = 6
# Device TTL 60 s, host TTL 120 s; requests ask for an hour, so an idle block goes
# device -> host after 60 s and host -> disk after 120 s.
TIERED = dict(block_size=BS, num_kv_blocks=64, host_kv_bytes=1 << 20, device_ttl_s=60.0, host_ttl_s=120.0)
HOUR = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, cache_ttl_s=3600.0)


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(n)] for n in (29, 22)]


def _cached(prompt: list[int]) -> int:
    return (len(prompt) - 1) // BS * BS  # the last token is always recomputed


def _settle(eng: LLMEngine) -> None:
    """Let pending tier work land: a step runs the demotions, the disk writes finish."""
    eng.step()
    if eng.tiers.disk is not None:
        assert eng.tiers.disk.flush()
    eng.step()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_are_identical_from_every_tier(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    path = tiny_model_dir(arch)
    prompts = _prompts(ARCHS.index(arch))
    hf = load_hf_model(path)
    expected = [hf_greedy(hf, p, NEW) for p in prompts]
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(str(path), clock=clock, disk_kv_dir=str(tmp_path), **TIERED)

    def run(tier: str | None) -> None:
        outs = eng.generate(prompts, HOUR)
        assert [o.token_ids for o in outs] == expected, tier
        want = [TokensByTier(**({tier: _cached(p)} if tier else {})) for p in prompts]
        assert [o.cached_tokens_by_tier for o in outs] == want
        assert [o.num_cached_tokens for o in outs] == [w.total for w in want]

    run(None)  # recompute
    run("device")
    clock.now += 61.0  # idle past the device TTL: demoted to host memory
    _settle(eng)
    run("host")
    clock.now += 121.0  # idle past device and host TTLs: demoted to disk
    _settle(eng)
    run("disk")
    s = eng.stats()
    assert s.tiers.num_promoted_from_host > 0 and s.tiers.num_promoted_from_disk > 0
    assert s.prefix_cache_hits_by_tier.total == s.prefix_cache_hits
    eng.close()


def test_the_disk_tier_survives_a_restart_and_only_its_own_model_hits_it(tiny_model_dir, tmp_path: Path) -> None:
    path = str(tiny_model_dir("llama"))
    prompt = _prompts(11)[0]
    clock = FakeClock()
    opts = dict(block_size=BS, num_kv_blocks=64, disk_kv_dir=str(tmp_path), device_ttl_s=60.0)
    first = LLMEngine.from_pretrained(path, clock=clock, **opts)
    (cold,) = first.generate([prompt], HOUR)
    clock.now += 61.0
    _settle(first)  # every cached block is now a file
    assert first.tiers.stats().disk_blocks >= _cached(prompt) // BS
    first.close()

    # Another block size or another model on the same directory: a different fingerprint, a miss.
    other_bs = LLMEngine.from_pretrained(path, clock=clock, **{**opts, "block_size": 8})
    assert other_bs.generate([prompt], HOUR)[0].num_cached_tokens == 0
    other_bs.close()
    other_model = LLMEngine.from_pretrained(str(tiny_model_dir("qwen2")), clock=clock, **opts)
    assert other_model.generate([prompt], HOUR)[0].num_cached_tokens == 0
    other_model.close()

    again = LLMEngine.from_pretrained(path, clock=clock, **opts)
    adopted = [e for e in again.take_events().events if isinstance(e, BlockStored)]
    assert adopted and all(e.tier == Tier.DISK for e in adopted)
    (warm,) = again.generate([prompt], HOUR)
    assert warm.token_ids == cold.token_ids
    assert warm.cached_tokens_by_tier == TokensByTier(disk=_cached(prompt))
    again.close()


def test_a_corrupt_block_file_is_a_miss_is_removed_and_tokens_do_not_change(tiny_model_dir, tmp_path: Path) -> None:
    path = str(tiny_model_dir("llama"))
    prompt = _prompts(12)[0]
    clock = FakeClock()
    opts = dict(block_size=BS, num_kv_blocks=64, disk_kv_dir=str(tmp_path), device_ttl_s=60.0)
    eng = LLMEngine.from_pretrained(path, clock=clock, **opts)
    (cold,) = eng.generate([prompt], HOUR)
    clock.now += 61.0
    _settle(eng)
    # Flip a byte in the middle of the third block's file (its checksum no longer matches).
    third = block_path(eng.tiers.disk.dir, hash_prompt_blocks(prompt, BS, eng.model_id)[2])
    raw = bytearray(third.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    third.write_bytes(bytes(raw))
    (out,) = eng.generate([prompt], HOUR)
    assert out.token_ids == cold.token_ids
    # The two blocks before it came back from disk; the request then started over from them.
    assert out.cached_tokens_by_tier == TokensByTier(device=2 * BS)
    assert eng.stats().tiers.num_failed_promotions == 1
    assert eng.tiers.disk.flush() and not third.exists()
    eng.close()


def test_other_requests_keep_running_while_one_waits_for_its_disk_blocks(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tiny_model_dir("llama"))
    waiting, other = _prompts(13)
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(path, clock=clock, block_size=BS, num_kv_blocks=64, disk_kv_dir=str(tmp_path),
                                    device_ttl_s=60.0)
    (cold,) = eng.generate([waiting], HOUR)
    clock.now += 61.0
    _settle(eng)
    # Hold the disk reads until the other request has made progress.
    gate = threading.Event()
    real_read = DiskTier._do_read
    monkeypatch.setattr(DiskTier, "_do_read", lambda self, op: (gate.wait(30), real_read(self, op)))
    eng.add_request("waits", waiting, HOUR)
    eng.add_request("runs", other, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    finished = {}
    for _ in range(3):
        finished |= {o.request_id: o for o in eng.step() if o.finished}
    assert eng.scheduler.promoting["waits"].status == RequestStatus.WAITING_FOR_KV_PROMOTION
    assert "runs" in finished  # three steps: prefill + two decodes, while "waits" waited
    gate.set()
    while eng.has_unfinished_requests():
        finished |= {o.request_id: o for o in eng.step() if o.finished}
    assert finished["waits"].token_ids == cold.token_ids
    assert finished["waits"].cached_tokens_by_tier == TokensByTier(disk=_cached(waiting))
    eng.close()


def test_a_decode_replica_promotes_its_disk_hit_while_the_rest_is_prefilled_remotely(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tiny_model_dir("llama"))
    history, question = _prompts(14)
    prompt = history + question
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, cache_ttl_s=3600.0)
    expected = LLMEngine.from_pretrained(path, block_size=BS, num_kv_blocks=64).generate([prompt], greedy)[0]
    clock = FakeClock()
    pre = LLMEngine.from_pretrained(path, role="prefill", block_size=BS, num_kv_blocks=64)
    dec = LLMEngine.from_pretrained(path, role="decode", clock=clock, block_size=BS, num_kv_blocks=64,
                                    disk_kv_dir=str(tmp_path), device_ttl_s=60.0, local_prefill_threshold=8)

    def remote(rid: str, ids: list[int]) -> RemotePrefillPlan:
        """The decode side parks ``rid``; a prefill engine computes it and the KV lands."""
        dec.add_request(rid, ids, greedy, remote_prefill=True)
        dec.step()
        (plan,) = dec.kv_transfer.take_plans()
        pre.add_request(rid, ids, greedy, export_from_block=plan.first_block_index)
        done = []
        while pre.has_unfinished_requests():
            done += [o for o in pre.step() if o.finished]
        (final,) = done
        buf = pre.kv_transfer.read_blocks(final.kv_export.block_ids)
        pre.kv_transfer.release_export(rid)
        dec.kv_transfer.write_blocks(plan.block_ids, buf)
        dec.kv_transfer.complete(rid, final.token_ids[0])
        return plan

    remote("turn1", history)  # the decode replica caches the history's blocks...
    while dec.has_unfinished_requests():
        dec.step()
    clock.now += 61.0  # ...which age onto disk
    _settle(dec)
    gate = threading.Event()
    real_read = DiskTier._do_read
    monkeypatch.setattr(DiskTier, "_do_read", lambda self, op: (gate.wait(30), real_read(self, op)))
    plan = remote("turn2", prompt)
    # Only the uncached tail went to the prefill replica; the KV landed first, the promotion is late.
    assert plan.first_block_index == _cached(history) // BS
    assert dec.scheduler.promoting["turn2"].status == RequestStatus.WAITING_FOR_KV_PROMOTION
    gate.set()
    outs = []
    while dec.has_unfinished_requests():
        outs += [o for o in dec.step() if o.finished]
    (out,) = outs
    assert out.token_ids == expected.token_ids
    assert out.cached_tokens_by_tier == TokensByTier(disk=_cached(history))
    dec.close()


def test_aborting_a_request_that_waits_for_its_promotion_leaks_nothing(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tiny_model_dir("llama"))
    prompt = _prompts(15)[0]
    clock = FakeClock()
    eng = LLMEngine.from_pretrained(path, clock=clock, block_size=BS, num_kv_blocks=64, disk_kv_dir=str(tmp_path),
                                    device_ttl_s=60.0)
    (cold,) = eng.generate([prompt], HOUR)
    clock.now += 61.0
    _settle(eng)
    gate = threading.Event()
    real_read = DiskTier._do_read
    monkeypatch.setattr(DiskTier, "_do_read", lambda self, op: (gate.wait(30), real_read(self, op)))
    eng.add_request("gone", prompt, HOUR)
    eng.step()
    assert eng.stats().num_waiting == 1 and "gone" in eng.scheduler.promoting
    eng.abort("gone")
    gate.set()
    while eng.tiers.jobs:  # the copy finishes into blocks nobody holds any more
        eng.step()
    assert all(b.ref_cnt == 0 for b in eng.pool.blocks) and not eng.has_unfinished_requests()
    (again,) = eng.generate([prompt], HOUR)  # the promoted blocks stayed cached on the device
    assert again.token_ids == cold.token_ids
    assert again.cached_tokens_by_tier == TokensByTier(device=_cached(prompt))
    eng.close()
