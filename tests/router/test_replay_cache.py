"""TieredCache (the replay's per-replica cache): demotion, TTLs, promotion, and the events it emits."""

from __future__ import annotations

import math
import random

import pytest

from engine.kv_events import BlockMoved, BlockRemoved, BlockStored, BlockTouched, KVEventBatch, Tier
from router.directory import KVDirectory
from router.replay_cache import TieredCache

D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def test_capacity_eviction_demotes_down_the_tiers_then_drops():
    c = TieredCache((2, 2, 2), (300.0, 3600.0, 86_400.0))
    c.use((1, 2), 0, start=0.0, finish=1.0)
    assert c.drain() == [BlockStored((1, 2), None, D, 301.0)]
    c.use((3, 4), 0, start=5.0, finish=6.0)
    # (1, 2) left the device for room at the request's start: host TTL from then.
    assert c.drain() == [BlockStored((3, 4), None, D, 306.0), BlockMoved((1, 2), H, 3605.0)]
    c.use((5, 6), 0, start=7.0, finish=8.0)
    c.use((7, 8), 0, start=9.0, finish=10.0)
    assert [c.tier_of(b) for b in range(1, 9)] == [None, None, K, K, H, H, D, D]
    ev = c.drain()
    assert ev[0] == BlockRemoved((1, 2))  # evicted from the last tier
    assert BlockMoved((3, 4), K, 86_409.0) in ev
    assert c.num_evicted == 2 and c.num_demotions == 10 and c.num_expired == 0


def test_ttl_expiry_demotes_with_each_tiers_own_ttl():
    c = TieredCache((8, 8, 8), (10.0, 100.0, 1000.0))
    c.use((1, 2, 3), 0, start=0.0, finish=0.0)
    c.drain()
    c.expire(9.999)
    assert c.prefix((1, 2, 3)) == [D, D, D] and c.drain() == []
    c.expire(10.0)
    assert c.prefix((1, 2, 3)) == [H, H, H]
    assert c.drain() == [BlockMoved((1, 2, 3), H, 110.0)]
    c.expire(110.0)
    assert c.drain() == [BlockMoved((1, 2, 3), K, 1110.0)]
    c.expire(1110.0)
    assert c.drain() == [BlockRemoved((1, 2, 3))] and c.prefix((1,)) == []
    assert c.num_expired == 9 and c.num_evicted == 0


def test_a_hit_promotes_and_slides_the_device_ttl():
    c = TieredCache((3, 8, 0), (10.0, 100.0, 1.0))
    c.use((1, 2, 3), 0, start=0.0, finish=0.0)
    c.expire(10.0)  # all three to host
    c.drain()
    c.use((1, 2, 3, 4), 3, start=20.0, finish=21.0)
    # 1..3 promoted (a move with the device expiry), 4 stored after 3; the device holds 3
    # blocks, so the LRU one (1) goes straight back to host at the start.
    assert c.num_promotions == 3
    assert [c.tier_of(b) for b in (1, 2, 3, 4)] == [H, D, D, D]
    ev = c.drain()
    assert BlockStored((4,), 3, D, 31.0) in ev and BlockMoved((2, 3), D, 31.0) in ev
    # 1 was promoted and demoted again within the batch: the net change is a new host expiry.
    assert BlockTouched((1,), 120.0) in ev and len(ev) == 3
    c.use((2, 3), 2, start=25.0, finish=26.0)
    assert c.drain() == [BlockTouched((2, 3), 36.0)]  # same tier: a touch


def test_a_device_only_view_reads_demotion_as_removal_and_promotion_as_store():
    c = TieredCache((1, 4, 0), (10.0, 100.0, 1.0), tier_events=False)
    c.use((1,), 0, start=0.0, finish=0.0)
    c.use((2,), 0, start=1.0, finish=1.0)
    assert c.drain() == [BlockStored((2,), None, D, 11.0)]  # 1 went to host unseen
    c.use((1,), 1, start=2.0, finish=2.0)
    assert c.drain() == [BlockRemoved((2,)), BlockStored((1,), None, D, 12.0)]


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError):
        TieredCache((1, 1), (1.0, 1.0))
    with pytest.raises(ValueError):
        TieredCache((1, -1, 0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        TieredCache((1, 1, 1), (1.0, 0.0, 1.0))


def test_random_workload_directory_agrees_with_the_cache_every_step():
    """Each block's tier and expiry in the cache equals what the directory learnt from the
    events, after every step; no tier ever exceeds its capacity."""
    rng = random.Random(3)
    cap, ttls = (6, 10, 14), (20.0, 60.0, 200.0)
    c = TieredCache(cap, ttls)
    d = KVDirectory()
    chains = [tuple(range(100 * i, 100 * i + 8)) for i in range(10)]
    now, seq = 0.0, -1
    for step in range(400):
        now += rng.expovariate(0.5) if rng.random() < 0.9 else rng.uniform(20.0, 250.0)  # idle spells
        c.expire(now)
        if rng.random() < 0.8:
            blocks = rng.choice(chains)[: rng.randrange(1, 9)]
            c.use(blocks, len(c.prefix(blocks)), start=now, finish=now + rng.random())
        events = c.drain()
        if events:
            seq += 1
            d.apply(KVEventBatch("r", seq, now, events))
        assert all(c.blocks_in(t) <= cap[t] for t in range(3)), step
        held = {b: (t, e) for b, t, e in _cache_state(c)}
        snap = {h: (int(t), e) for h, _, t, e in d.snapshot()[0].blocks} if d.replica_ids() else {}
        assert snap.keys() == held.keys(), step
        for b, (t, e) in held.items():
            assert snap[b][0] == t and math.isclose(snap[b][1], e, abs_tol=1e-3), (step, b)
    assert c.num_demotions and c.num_promotions and c.num_expired and c.num_evicted


def _cache_state(c: TieredCache):
    """(block, tier, expiry) of every block held (reads the private maps: a test of this module)."""
    for b, t in c._where.items():
        yield b, t, c._exp[b]
