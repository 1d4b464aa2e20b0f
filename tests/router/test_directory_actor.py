"""The directory actor on a real local Ray: round trip, and rebuilding after a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.block_hash import hash_prompt_blocks
from engine.kv_events import BlockStored, CacheSnapshot, KVEventBatch, Tier
from router.directory import PrefixMatch
from router.event_flusher import KVEventFlusher

pytestmark = pytest.mark.ray

H = hash_prompt_blocks(list(range(16 * 8)), 16, "m")


def _stored(hashes, ttl=300.0):
    return BlockStored(tuple(hashes), None, Tier.DEVICE, time.time() + ttl)


def test_actor_round_trip(ray_cluster):
    import ray

    from router.directory_actor import get_or_create_directory

    d = get_or_create_directory("test-roundtrip")
    assert ray.get(d.apply_batches.remote([KVEventBatch("a", 0, 0.0, [_stored(H[:5])]),
                                           KVEventBatch("b", 0, 0.0, [_stored(H[:2])])])) == []
    m = ray.get(d.lookup.remote(H))
    assert m == {"a": PrefixMatch(5, Tier.DEVICE, (5, 0, 0)), "b": PrefixMatch(2, Tier.DEVICE, (2, 0, 0))}
    # Same name -> same actor; gaps are reported back; expiry is swept.
    d2 = get_or_create_directory("test-roundtrip")
    assert ray.get(d2.apply_batches.remote([KVEventBatch("a", 3, 0.0, [_stored(H[5:6], ttl=0.2)])])) == ["a"]
    assert ray.get(d2.drop_replica.remote("b")) == 2
    time.sleep(0.3)
    assert ray.get(d2.sweep.remote()) == 1
    assert ray.get(d2.stats.remote())["num_entries"] == 5
    ray.kill(d, no_restart=True)


def test_actor_rebuilds_from_replica_snapshots_after_restart(ray_cluster):
    import ray

    from router.directory_actor import get_or_create_directory

    d = get_or_create_directory("test-restart")
    held = {"a": list(H[:6])}
    seq = {"a": -1}

    async def snapshot_fn():
        return CacheSnapshot("a", seq["a"], time.time(),
                             [(h, None, Tier.DEVICE, time.time() + 300) for h in held["a"]])

    async def scenario():
        # Wait for the actor: its cold start on a loaded 2-core box can outlast the
        # flusher's 5 s timeout, and the first flush must succeed for this scenario.
        await d.stats.remote()
        f = KVEventFlusher(d, snapshot_fn)
        seq["a"] += 1
        f.add(KVEventBatch("a", seq["a"], 0.0, [_stored(H[:6])]))
        assert await f.flush()
        assert (await d.lookup.remote(H))["a"].num_blocks == 6
        ray.kill(d, no_restart=False)  # crash: Ray restarts it empty
        for _ in range(100):
            try:
                if (await d.stats.remote())["num_entries"] == 0:
                    break
            except Exception:  # noqa: BLE001 - still restarting
                await asyncio.sleep(0.1)
        # Next flush: seq_no 1 on a fresh directory is a gap -> it asks for a snapshot.
        seq["a"] += 1
        held["a"] = held["a"] + [H[6]]
        f.add(KVEventBatch("a", seq["a"], 0.0, [_stored(H[6:7])]))
        for _ in range(50):
            if await f.flush():
                break
            await asyncio.sleep(0.1)
        assert f.num_snapshots == 1
        assert (await d.lookup.remote(H))["a"].num_blocks == 7
        assert (await d.stats.remote())["replicas_needing_snapshot"] == []

    asyncio.run(scenario())
    ray.kill(d, no_restart=True)
