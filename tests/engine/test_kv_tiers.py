"""KV tiers without a model: demotion on capacity and on TTL, per-tier TTLs on a fake
clock, promotion restoring the exact KV, host capacity, and the events they emit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.block_pool import BlockPool
from engine.kv_events import BlockMoved, BlockRemoved, BlockStored, Tier
from engine.kv_tiers.block_copy import BlockCopier
from engine.kv_tiers.disk_tier import DiskTier
from engine.kv_tiers.host_tier import HostTier
from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tiered_kv import LowerHit, TieredKV

L, BS, H, D = 2, 4, 2, 8


def make_tiers(tmp_path: Path | None, num_blocks: int = 4, host_rows: int = 8, device_ttl: float = 60.0,
               host_ttl: float = 120.0, disk_ttl: float = 300.0, disk_bytes: int = 1 << 20) -> TieredKV:
    kv_cache = torch.zeros((L, 2, num_blocks, BS, H, D))
    lifetimes = TierLifetimes(host_rows > 0, tmp_path is not None, device_ttl, host_ttl, disk_ttl)
    pool = BlockPool(num_blocks, ttl_cap_s=lifetimes.cap(Tier.DEVICE))
    copier = BlockCopier(kv_cache)
    host = HostTier(copier.host_buffer(host_rows)) if host_rows else None
    disk = DiskTier(tmp_path, disk_bytes, "f" * 32, copier.block_shape, kv_cache.dtype) if tmp_path else None
    return TieredKV(pool, copier, lifetimes, host, disk)


def store(tiers: TieredKV, hashes: list[int], now: float, ttl: float) -> dict[int, torch.Tensor]:
    """Cache one block per hash with distinct KV, release them; return each block's KV."""
    pool = tiers.pool
    blocks = pool.allocate(len(hashes), now)
    kv = {}
    for b, h in zip(blocks, hashes):
        tiers.copier.kv_cache[:, :, b.block_id] = float(h)
        kv[h] = tiers.copier.kv_cache[:, :, b.block_id].clone()
    pool.cache_blocks([(b, h, None, (h,)) for b, h in zip(blocks, hashes)], now, ttl)
    pool.free(reversed(blocks), now)
    return kv


def events(tiers: TieredKV) -> list:
    return [e for e in tiers.pool.take_events() if not isinstance(e, BlockStored)]


def test_lifetimes_per_tier() -> None:
    lt = TierLifetimes(True, True, device_ttl_s=300, host_ttl_s=3600, disk_ttl_s=86400)
    assert lt.expiry(Tier.DEVICE, 0.0, 3600) == 300  # a 1 h block leaves the device after 5 idle minutes
    assert lt.demotion_target(Tier.DEVICE, 0.0, 3600, now=300) == (Tier.HOST, 3600)
    assert lt.demotion_target(Tier.HOST, 0.0, 86400, now=3600) == (Tier.DISK, 86400)
    assert lt.demotion_target(Tier.DEVICE, 0.0, 300, now=300) is None  # its lifetime is over
    assert lt.demotion_target(Tier.DEVICE, 0.0, 300, now=10) == (Tier.HOST, 300)  # evicted early: keeps its 5 min
    # Without a lower tier the device keeps a block its whole lifetime.
    assert TierLifetimes(False, False).cap(Tier.DEVICE) == math.inf
    assert TierLifetimes(False, True).demotion_target(Tier.DEVICE, 0.0, 3600, now=300) == (Tier.DISK, 3600)


def test_capacity_eviction_demotes_to_host_and_promotion_restores_the_kv() -> None:
    tiers = make_tiers(None)
    kv = store(tiers, [11, 12, 13, 14], now=0.0, ttl=3600.0)
    tiers.pool.take_events()
    # Two new blocks: the two least recently used (released tail first, so 14 then 13) move
    # to host memory instead of vanishing.
    tiers.pool.allocate(2, now=5.0)
    moved = events(tiers)
    assert moved == [BlockMoved((14, 13), Tier.HOST, 120.0)]  # expiry: last use 0 + host TTL 120
    hit = tiers.find(14, (14,), now=6.0)
    assert isinstance(hit, LowerHit) and hit.tier == Tier.HOST
    assert tiers.find(14, (99,), now=6.0) is None  # tokens are compared: a collision is a miss
    (block,) = tiers.promote([hit], now=6.0)
    assert not block.pending  # host -> device on CPU is synchronous
    assert torch.equal(tiers.copier.kv_cache[:, :, block.block_id], kv[14])
    assert tiers.pool.lookup(14, (14,), now=6.0) is block
    # Its device block was made by evicting the next LRU block (12) to host, in event order.
    assert events(tiers) == [BlockMoved((12,), Tier.HOST, 120.0), BlockMoved((14,), Tier.DEVICE, 6.0 + 60.0)]
    assert tiers.find(14, (14,), now=6.0) is None  # one tier at a time


def test_ttl_demotes_device_to_host_to_disk_then_drops(tmp_path: Path) -> None:
    tiers = make_tiers(tmp_path)
    store(tiers, [21], now=0.0, ttl=3600.0)  # a 1 h block
    store(tiers, [22], now=0.0, ttl=30.0)  # shorter than the device TTL: never demoted
    tiers.pool.take_events()
    tiers.poll(31.0)
    assert events(tiers) == [BlockRemoved((22,))]
    tiers.poll(59.0)
    assert events(tiers) == []
    tiers.poll(60.0)  # device TTL 60 s
    assert events(tiers) == [BlockMoved((21,), Tier.HOST, 120.0)]
    tiers.poll(120.0)  # host TTL 120 s
    assert events(tiers) == [BlockMoved((21,), Tier.DISK, 300.0)]
    assert tiers.disk.flush()
    assert len(list(tiers.disk.dir.glob("*/*.kvb"))) == 1
    assert tiers.find(21, (21,), now=299.0).tier == Tier.DISK
    tiers.poll(300.0)  # disk TTL 300 s
    assert events(tiers) == [BlockRemoved((21,))]
    assert tiers.disk.flush()
    assert list(tiers.disk.dir.glob("*/*.kvb")) == []
    tiers.close()


def test_a_full_host_tier_sends_its_lru_block_to_disk_and_never_grows(tmp_path: Path) -> None:
    tiers = make_tiers(tmp_path, num_blocks=2, host_rows=2)
    kv = {}
    for t, h in enumerate([31, 32, 33, 34, 35]):
        kv |= store(tiers, [h], now=float(t), ttl=3600.0)
        tiers.pool.allocate(2, now=float(t))  # push every cached block off the device
        tiers.pool.free(tiers.pool.blocks, now=float(t))
        assert len(tiers.host.index) + tiers.host.num_busy_rows <= 2
    assert set(tiers.host.index.entries) == {34, 35}
    assert set(tiers.disk.index.entries) == {31, 32, 33}
    # The disk copy holds the same KV: promote it back and compare.
    hit = tiers.find(31, (31,), now=10.0)
    assert hit.tier == Tier.DISK
    (block,) = tiers.promote([hit], now=10.0)
    while tiers.jobs:
        tiers.wait_for_progress(1.0)
        tiers.poll(10.0)
    assert torch.equal(tiers.copier.kv_cache[:, :, block.block_id], kv[31])
    tiers.close()


def test_storing_a_hash_on_the_device_drops_its_lower_copy_first() -> None:
    tiers = make_tiers(None)
    store(tiers, [41, 42, 43, 44], now=0.0, ttl=3600.0)
    tiers.pool.allocate(4, now=1.0)  # all four go to host
    tiers.pool.take_events()
    held = tiers.pool.blocks[0]  # now held by a request recomputing block 43
    tiers.pool.cache_blocks([(held, 43, 42, (43,))], now=2.0, ttl_s=300.0)
    evs = tiers.pool.take_events()
    assert evs[0] == BlockRemoved((43,)) and isinstance(evs[1], BlockStored) and evs[1].hashes == (43,)
    assert 43 not in tiers.host.index


def test_host_rows_must_hold_a_block() -> None:
    from engine.config import EngineConfig
    from engine.kv_tiers.build import build_tiers

    pool = BlockPool(4)
    with pytest.raises(ValueError, match="holds no KV block"):
        build_tiers(EngineConfig(host_kv_bytes=100), pool, torch.zeros((L, 2, 4, BS, H, D)), torch.nn.Linear(2, 2),
                    "m", 0.0)


def test_a_disk_that_falls_behind_gets_no_more_demotions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from engine.kv_tiers import disk_tier

    tiers = make_tiers(tmp_path, num_blocks=2, host_rows=0)
    gate = threading.Event()
    real_write = disk_tier.DiskTier._do_write
    monkeypatch.setattr(disk_tier.DiskTier, "_do_write", lambda self, op: (gate.wait(30), real_write(self, op)))
    monkeypatch.setattr(disk_tier, "MAX_PENDING_WRITE_BYTES", 2 * tiers.disk.block_nbytes)
    store(tiers, [51, 52], now=0.0, ttl=3600.0)
    tiers.pool.allocate(2, now=1.0)  # both go to disk (the writes are stuck behind the gate)
    tiers.pool.free(tiers.pool.blocks, now=1.0)
    store(tiers, [53, 54], now=2.0, ttl=3600.0)
    tiers.pool.take_events()
    tiers.pool.allocate(2, now=3.0)  # two writes already wait: these are dropped, not queued
    assert events(tiers) == [BlockRemoved((54, 53))]
    gate.set()
    assert tiers.disk.flush()
    tiers.poll(4.0)
    assert set(tiers.disk.index.entries) == {51, 52} and not tiers.disk.backlogged
    tiers.close()
