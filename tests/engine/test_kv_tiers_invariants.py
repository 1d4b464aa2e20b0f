"""A random workload over device, host and disk tiers, with invariants checked every step:

* each cached block's tier in the engine is the tier the KV directory learnt from the
  events (``router.directory.KVDirectory``), and its expiry is the one the events said;
* a hash lives in one tier at a time;
* no tier ever holds more than its capacity (device blocks, host rows, disk bytes);
* every output's tokens match a reference engine with no tiers at all.
"""

from __future__ import annotations

import random
from pathlib import Path

from engine import LLMEngine, SamplingParams
from engine.kv_events import AllCleared, BlockMoved, BlockRemoved, BlockStored, BlockTouched, Tier
from router.directory import KVDirectory
from tests.engine.test_engine_lifecycle import FakeClock

BS = 4


def _apply(model: dict[int, tuple[Tier, float]], events: list) -> None:
    """The contract, applied literally: what each event means for (tier, expiry) per hash."""
    for ev in events:
        if isinstance(ev, BlockStored):
            for h in ev.hashes:
                assert h not in model, f"stored {h:#x} while it was in {model[h][0].name}"
                model[h] = (ev.tier, ev.expires_at)
        elif isinstance(ev, BlockTouched):
            for h in ev.hashes:
                assert model[h][0] == Tier.DEVICE
                model[h] = (Tier.DEVICE, ev.expires_at)
        elif isinstance(ev, BlockMoved):
            for h in ev.hashes:
                assert model[h][0] != ev.tier
                model[h] = (ev.tier, ev.expires_at)
        elif isinstance(ev, BlockRemoved):
            for h in ev.hashes:
                del model[h]
        elif isinstance(ev, AllCleared):
            model.clear()


def _engine_state(eng: LLMEngine) -> dict[int, tuple[Tier, float]]:
    """Every block the engine tracks, per tier (expired-but-unprocessed ones included)."""
    device = {h: (Tier.DEVICE, b.expires_at) for h, b in eng.pool._cached.items()}
    host = {h: (Tier.HOST, e.expires_at) for h, e in eng.tiers.host.index.entries.items()}
    disk = {h: (Tier.DISK, e.expires_at) for h, e in eng.tiers.disk.index.entries.items()}
    assert not (device.keys() & host.keys() or device.keys() & disk.keys() or host.keys() & disk.keys())
    return device | host | disk


def _check_capacity(eng: LLMEngine, disk_bytes: int) -> None:
    assert sum(1 for b in eng.pool.blocks if b.block_hash is not None) <= eng.pool.num_blocks
    host = eng.tiers.host
    assert len(host.index) + host.num_busy_rows + host.num_free_rows == host.capacity
    assert eng.tiers.disk.budget.used_bytes() <= disk_bytes


def test_random_workload_keeps_engine_and_directory_in_agreement(tiny_model_dir, tmp_path: Path) -> None:
    path = str(tiny_model_dir("llama"))
    rng = random.Random(7)
    clock = FakeClock()
    probe = LLMEngine.from_pretrained(path, block_size=BS, num_kv_blocks=4, host_kv_bytes=1 << 20)
    block_file = probe.tiers.copier.block_nbytes + 400  # payload + header
    disk_bytes = 24 * block_file
    eng = LLMEngine.from_pretrained(
        path, clock=clock, block_size=BS, num_kv_blocks=20, max_num_seqs=4, max_num_batched_tokens=32,
        host_kv_bytes=10 * probe.tiers.copier.block_nbytes, disk_kv_dir=str(tmp_path), disk_kv_bytes=disk_bytes,
        device_ttl_s=30.0, host_ttl_s=90.0, disk_ttl_s=400.0, default_ttl_s=20.0, replica_id="r0",
    )
    ref = LLMEngine.from_pretrained(path, block_size=BS, num_kv_blocks=256)
    directory = KVDirectory()
    model: dict[int, tuple[Tier, float]] = {}
    heads = [[rng.randrange(3, 250) for _ in range(rng.choice((8, 12, 16)))] for _ in range(5)]
    expected: dict[str, list[int]] = {}
    live: set[str] = set()
    for i in range(120):
        if len(live) < 4 and rng.random() < 0.5:
            prompt = rng.choice(heads) + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 14))]
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 5), ignore_eos=True,
                                    cache_ttl_s=rng.choice((None, 300.0, 3600.0)))
            rid = f"q{i}"
            eng.add_request(rid, prompt, params)
            expected[rid] = ref.generate([prompt], params)[0].token_ids
            live.add(rid)
        if rng.random() < 0.15:
            clock.now += rng.choice((5.0, 25.0, 40.0, 100.0))
        if live and rng.random() < 0.03:
            victim = sorted(live)[0]
            eng.abort(victim)
            live.discard(victim)
            expected.pop(victim)
        for out in eng.step():
            if out.finished and out.request_id in expected:
                assert out.token_ids == expected.pop(out.request_id)
                live.discard(out.request_id)
        batch = eng.take_events()
        if batch is not None:
            directory.apply(batch)
            _apply(model, batch.events)
        state = _engine_state(eng)
        assert state == model
        (snap,) = directory.snapshot() or [None]
        known = {h: tier for h, _, tier, _ in snap.blocks} if snap else {}
        assert known == {h: tier for h, (tier, _) in state.items()}
        _check_capacity(eng, disk_bytes)
    while eng.has_unfinished_requests():
        eng.step()
    s = eng.stats()
    # The workload did exercise every path it claims to.
    assert s.tiers.num_demoted_to_host and s.tiers.num_demoted_to_disk
    assert s.tiers.num_promoted_from_host and s.tiers.num_promoted_from_disk
    assert s.tiers.num_host_expired and s.tiers.num_disk_expired and s.num_expired_blocks and s.num_evicted_blocks
    eng.close()
