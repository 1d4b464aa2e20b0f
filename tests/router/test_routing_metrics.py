"""Routing-side tier metrics: hits by tier as the router saw them, directory entries by tier."""

from __future__ import annotations

from collections import defaultdict

import pytest

import router.metrics as rm
from engine.kv_events import Tier
from router.directory import PrefixMatch
from router.metrics import ROUTER_CATALOG, TIERS, DirectoryMetrics, RoutingMetrics, cached_tokens_by_tier


def test_cached_tokens_by_tier_splits_the_match_and_never_exceeds_the_prompt():
    assert cached_tokens_by_tier(None, 100, 16) == (0, 0, 0)
    assert cached_tokens_by_tier(PrefixMatch(0, Tier.DEVICE), 100, 16) == (0, 0, 0)
    assert cached_tokens_by_tier(PrefixMatch(5, Tier.DISK, (2, 2, 1)), 100, 16) == (32, 32, 16)
    # A bare (num_blocks, tier) match counts all of its blocks in that tier.
    assert cached_tokens_by_tier(PrefixMatch(3, Tier.HOST), 100, 16) == (0, 48, 0)
    # A fully cached 64-token prompt: the excess over the prompt comes off the slowest tier.
    assert cached_tokens_by_tier(PrefixMatch(5, Tier.DISK, (3, 1, 1)), 64, 16) == (48, 16, 0)
    assert cached_tokens_by_tier(PrefixMatch(5, Tier.DISK, (3, 1, 1)), 40, 16) == (40, 0, 0)


class _Recorder:
    """Stands in for a ray.util.metrics object: records inc / set calls by tags."""

    def __init__(self) -> None:
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, n: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] += n

    def set(self, n: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] = n


@pytest.fixture
def recorders(monkeypatch):
    made: dict[str, _Recorder] = {}

    def make(name: str) -> _Recorder:
        assert name in {s.name for s in ROUTER_CATALOG}, name
        return made.setdefault(name, _Recorder())

    monkeypatch.setattr(rm, "_make", make)
    return made


def test_routed_counts_prompt_tokens_and_cached_tokens_per_tier(recorders):
    m = RoutingMetrics("prefill")
    m.routed(100, (32, 48, 0))
    m.routed(50, (0, 0, 16))
    assert recorders["kvferry_routing_prompt_tokens_total"].values == {(("pool", "prefill"),): 150}
    assert dict(recorders["kvferry_routing_cached_tokens_total"].values) == {
        (("pool", "prefill"), ("tier", "device")): 32,
        (("pool", "prefill"), ("tier", "host")): 48,
        (("pool", "prefill"), ("tier", "disk")): 16,
    }


def test_directory_publishes_entries_by_tier(recorders):
    DirectoryMetrics("decode").publish(10, 0, (6, 3, 1))
    got = recorders["kvferry_directory_entries_by_tier"].values
    assert {dict(k)["tier"]: v for k, v in got.items()} == dict(zip(TIERS, (6, 3, 1)))


def test_a_failing_metrics_backend_never_raises(monkeypatch):
    def broken(name: str):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(rm, "_make", broken)
    RoutingMetrics("prefill").routed(10, (1, 2, 3))
    DirectoryMetrics("prefill").publish(1, 0, (1, 0, 0))
