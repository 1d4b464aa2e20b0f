"""Block pool: eviction order, TTL expiry and sliding refresh, collision safety, events."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from engine.kv_events import AllCleared, BlockRemoved, BlockStored, BlockTouched, Tier


def _cache(pool: BlockPool, blocks, hashes, now: float, ttl: float = 300.0) -> None:
    entries = []
    parent = None
    for b, h in zip(blocks, hashes):
        entries.append((b, h, parent, (h, h + 1)))
        parent = h
    pool.cache_blocks(entries, now, ttl)


def test_eviction_order_is_uncached_then_expired_then_lru() -> None:
    pool = BlockPool(6)
    a = pool.allocate(6, now=0.0)
    assert a is not None and [b.block_id for b in a] == [0, 1, 2, 3, 4, 5]
    # Blocks 0..3 get cached: 0 and 1 with a short TTL, 2 and 3 with the default.
    _cache(pool, a[0:2], [100, 101], now=0.0, ttl=10.0)
    _cache(pool, a[2:4], [200, 201], now=0.0, ttl=300.0)
    # Release in this order: 3, 2 (cached, LRU order 3 then 2), 5 (uncached), 1, 0 (short TTL), 4.
    pool.free([a[3], a[2], a[5], a[1], a[0], a[4]], now=1.0)
    # Block 2 is hit again at t=2: it becomes the most recently used.
    hit = pool.lookup(200, (200, 201), now=2.0)
    assert hit is a[2]
    pool.touch([hit], now=2.0, ttl_s=300.0)
    pool.free([hit], now=2.0)
    pool.take_events()
    # At t=20 blocks 0 and 1 have expired. Expected order: uncached 5, 4; expired 0, 1
    # (oldest expiry first, ties by block id); then unexpired LRU 3, 2 (2 was hit last).
    order = [pool.allocate(1, now=20.0)[0].block_id for _ in range(6)]
    assert order == [5, 4, 0, 1, 3, 2]
    assert pool.allocate(1, now=20.0) is None
    removed = [h for e in pool.take_events() if isinstance(e, BlockRemoved) for h in e.hashes]
    assert removed == [100, 101, 201, 200]


def test_expired_blocks_are_never_hits_and_hits_slide_the_ttl() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1, now=0.0)
    _cache(pool, [b], [7], now=0.0, ttl=300.0)
    pool.free([b], now=0.0)
    assert pool.lookup(7, (7, 8), now=299.0) is b
    pool.touch([b], now=299.0, ttl_s=300.0)  # sliding: now expires at 599
    pool.free([b], now=299.0)
    assert pool.lookup(7, (7, 8), now=500.0) is b
    assert pool.lookup(7, (7, 8), now=599.0) is None
    # A request asking for 1h extends it; a later 5-minute hit never shortens it.
    pool2 = BlockPool(2)
    (c,) = pool2.allocate(1, now=0.0)
    _cache(pool2, [c], [9], now=0.0, ttl=3600.0)
    pool2.touch([c], now=10.0, ttl_s=300.0)
    assert c.expires_at == 3610.0


def test_collision_never_returns_other_tokens() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1, now=0.0)
    pool.cache_blocks([(b, 42, None, (1, 2))], now=0.0, ttl_s=60.0)
    assert pool.lookup(42, (1, 2), now=1.0) is b
    assert pool.lookup(42, (1, 3), now=1.0) is None


def test_held_blocks_are_never_evicted_and_double_free_is_caught() -> None:
    pool = BlockPool(3)
    held = pool.allocate(2, now=0.0)
    assert pool.allocate(2, now=0.0) is None
    (other,) = pool.allocate(1, now=0.0)
    assert other not in held
    pool.free([other], now=0.0)
    with pytest.raises(RuntimeError):
        pool.free([other], now=0.0)


def test_events_stored_touched_removed_cleared() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3, now=0.0)
    _cache(pool, blocks, [1, 2, 3], now=0.0, ttl=300.0)
    pool.touch(blocks[:2], now=5.0, ttl_s=300.0)
    pool.free(list(reversed(blocks)), now=5.0)
    pool.free(blocks[:2], now=5.0)
    pool.clear_cache()
    events = pool.take_events()
    assert events[0] == BlockStored((1, 2, 3), None, Tier.DEVICE, 300.0)
    assert events[1] == BlockTouched((1, 2), 305.0)
    assert events[2] == AllCleared()
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 4
    assert pool.take_events() == []


def test_duplicate_hash_keeps_one_copy() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2, now=0.0)
    pool.cache_blocks([(a, 5, None, (1,))], now=0.0, ttl_s=10.0)
    pool.cache_blocks([(b, 5, None, (1,))], now=0.0, ttl_s=10.0)
    assert a.block_hash == 5 and b.block_hash is None
    assert pool.num_cached_blocks == 1
