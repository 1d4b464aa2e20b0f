"""Replica metrics of the KV tiers, fed from ``EngineStats``: hits by tier, blocks and bytes
by tier, demotions, promotions, TTL expiries vs capacity evictions, promote latency.

The Ray metric objects are replaced by recorders (this tests the mapping from engine stats
to series, not Ray's exporter; the live-Prometheus test covers that path)."""

from __future__ import annotations

from collections import defaultdict

from cluster.metrics import REPLICA_CATALOG, ReplicaMetrics
from engine.outputs import EngineStats, TierStats, TokensByTier


class _Series:
    def __init__(self) -> None:
        self.values: dict[tuple, float] = defaultdict(float)
        self.observed: list[float] = []

    def inc(self, value: float, tags: dict | None = None) -> None:
        self.values[tuple(sorted((tags or {}).items()))] += value

    def set(self, value: float, tags: dict | None = None) -> None:
        self.values[tuple(sorted((tags or {}).items()))] = value

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.observed.append(value)


def _metrics() -> ReplicaMetrics:
    m = ReplicaMetrics.__new__(ReplicaMetrics)
    m._m = {spec.name: _Series() for spec in REPLICA_CATALOG}
    m._last = {}
    return m


def _stats(n: int) -> EngineStats:
    return EngineStats(
        num_free_blocks=6, num_total_blocks=10, num_cached_blocks=2, kv_block_bytes=100,
        prefix_cache_hits=9 * n, prefix_cache_hits_by_tier=TokensByTier(device=2 * n, host=3 * n, disk=4 * n),
        tiers=TierStats(host_capacity_blocks=8, host_blocks=3, host_busy_blocks=1, disk_capacity_bytes=5000,
                        disk_blocks=4, disk_bytes=480, num_demoted_to_host=5 * n, num_demoted_to_disk=n,
                        num_promoted_from_host=2 * n, num_promoted_from_disk=n, num_host_expired=n,
                        num_host_evicted=2 * n, num_failed_promotions=n,
                        recent_promote_seconds=tuple(0.001 * i for i in range(1, 2 * n + 1)), num_promotions=2 * n),
    )


def test_tier_series_follow_the_engine_stats() -> None:
    m = _metrics()
    m.engine_stats(_stats(1))
    m.engine_stats(_stats(3))  # cumulative counters feed increments; gauges are set
    v = lambda name, **tags: m._m[name].values[tuple(sorted(tags.items()))]  # noqa: E731
    assert [v("kvferry_prefix_cache_hits_by_tier_total", tier=t) for t in ("device", "host", "disk")] == [6, 9, 12]
    assert v("kvferry_kv_blocks", tier="host", state="cached") == 3
    assert v("kvferry_kv_blocks", tier="host", state="free") == 4
    assert v("kvferry_kv_blocks", tier="disk", state="cached") == 4
    assert v("kvferry_kv_bytes", tier="device", kind="used") == 600  # 4 held + 2 cached blocks
    assert v("kvferry_kv_bytes", tier="host", kind="capacity") == 800
    assert v("kvferry_kv_bytes", tier="disk", kind="used") == 480
    assert v("kvferry_kv_block_demotions_total", tier="host") == 15
    assert v("kvferry_kv_block_promotions_total", tier="disk") == 3
    assert v("kvferry_kv_block_evictions_total", tier="host", reason="capacity") == 6
    assert v("kvferry_kv_promotion_failures_total") == 3
    # Two promotions, then four more: each latency observed once.
    assert m._m["kvferry_kv_promote_seconds"].observed == [0.001, 0.002, 0.003, 0.004, 0.005, 0.006]


def test_an_engine_without_lower_tiers_exports_only_device_series() -> None:
    m = _metrics()
    m.engine_stats(EngineStats(num_total_blocks=4, num_free_blocks=4, kv_block_bytes=10))
    tiers = {dict(k).get("tier") for k in m._m["kvferry_kv_blocks"].values}
    assert tiers == {"device"}
    assert m._m["kvferry_kv_promote_seconds"].observed == []
