"""The explicit-cache registry (``cluster.explicit_caches``), pure, with an explicit clock:
owner-only visibility, the per-key token budget, paging, fixed expiry, and which pins a
replica keeps when it syncs."""

from __future__ import annotations

import pytest

from cluster.explicit_caches import BudgetExceeded, ExplicitCache, ExplicitCacheRegistry
from cluster.inference import ChatTurn


def _cache(cid: str, owner: str = "alice", tokens: int = 100, t: float = 0.0, ttl: float = 60.0) -> ExplicitCache:
    return ExplicitCache(cid, owner, "m", "", (ChatTurn("user", "hi"),), tokens, t, t, t + ttl)


def test_budget_is_per_owner_and_frees_on_delete_and_expiry() -> None:
    reg = ExplicitCacheRegistry(budget_tokens=250)
    reg.reserve(_cache("a"), 0)
    reg.reserve(_cache("b", ttl=10), 0)
    reg.reserve(_cache("x", owner="bob", tokens=250), 0)  # bob has his own budget
    with pytest.raises(BudgetExceeded, match="250"):
        reg.reserve(_cache("c"), 1)
    assert reg.delete("a", "alice", 1)
    reg.reserve(_cache("c", t=1), 1)
    with pytest.raises(BudgetExceeded):
        reg.reserve(_cache("d", t=2), 2)
    reg.reserve(_cache("d", t=11), 11)  # "b" expired at 10: its tokens are free again
    assert reg.stats(11).num_caches == 3 and reg.num_expired == 1


def test_only_the_owner_sees_updates_or_deletes_a_cache() -> None:
    reg = ExplicitCacheRegistry(10_000)
    reg.reserve(_cache("a"), 0)
    assert reg.get("a", "bob", 1) is None and reg.set_expiry("a", "bob", 500, 1) is None
    assert not reg.delete("a", "bob", 1) and reg.list("bob", 1, 10) == ([], "")
    moved = reg.set_expiry("a", "alice", 500, 5)
    assert moved.expires_at == 500 and moved.update_time == 5
    assert reg.get("a", "alice", 499) is not None and reg.get("a", "alice", 500) is None  # fixed expiry


def test_pages_follow_creation_order_and_survive_deletions() -> None:
    reg = ExplicitCacheRegistry(10_000)
    for i in range(5):
        reg.reserve(_cache(f"c{i}", t=i, ttl=100), i)
    page, token = reg.list("alice", 5, 2)
    assert [c.cache_id for c in page] == ["c0", "c1"] and token
    reg.delete("c2", "alice", 5)
    page, token = reg.list("alice", 5, 2, token)
    assert [c.cache_id for c in page] == ["c3", "c4"] and token == ""
    with pytest.raises(ValueError, match="pageToken"):
        reg.list("alice", 5, 2, "not-a-token")


def test_a_replica_keeps_only_the_pins_the_registry_places_on_it() -> None:
    reg = ExplicitCacheRegistry(10_000)
    reg.reserve(_cache("new"), 0)  # being created: kept wherever it is pinned
    reg.reserve(_cache("here"), 0)
    reg.placed("here", "r1", 0)
    reg.reserve(_cache("moved"), 0)
    reg.placed("moved", "r2", 0)  # re-pinned on r2 after r1 was unreachable
    live = reg.live(["new", "here", "moved", "deleted"], "r1", 1)
    assert live == {"new": 60.0, "here": 60.0}
    assert reg.live(["here"], "r1", 61) == {}  # expired
