"""Using an explicit cache (``cluster.explicit_cache_api``), without Ray: the cache's turns
prefix the request's, the request prefers (and re-pins on) the cache's replica, and a use
that lands on another replica (the pinning one died) moves the cache there."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import ServeConfig
from cluster.explicit_cache_api import ExplicitCaches
from cluster.explicit_caches import ExplicitCache
from cluster.inference import CachePin, ChatTurn, InferenceRequest
from cluster.wire import ApiError

CACHE = ExplicitCache("c1", "owner", "m", "", (ChatTurn("system", "S"), ChatTurn("user", "U")), 40, 0.0, 0.0,
                      500.0, replica_id="replica-1")


class _Registry:
    """Records ``placed`` calls as a Ray actor handle would receive them."""

    def __init__(self) -> None:
        self.placed_calls: list[tuple[str, str]] = []
        self.placed = SimpleNamespace(remote=self._placed)

    async def _placed(self, cache_id: str, replica_id: str) -> None:
        self.placed_calls.append((cache_id, replica_id))


def _caches() -> tuple[ExplicitCaches, _Registry]:
    reg = _Registry()
    door = SimpleNamespace(cfg=ServeConfig())
    return ExplicitCaches(door, registry=lambda: reg), reg  # type: ignore[arg-type]


def test_the_cache_prefixes_the_request_and_routes_it_to_its_replica() -> None:
    req = InferenceRequest("r", "m", messages=(ChatTurn("user", "Q"),))
    used = ExplicitCaches.apply(CACHE, req)
    assert used.messages == (ChatTurn("system", "S"), ChatTurn("user", "U"), ChatTurn("user", "Q"))
    assert used.prefer_replica == "replica-1" and used.pin == CachePin("c1", 500.0, 40)
    with pytest.raises(ApiError, match="system instruction"):
        ExplicitCaches.apply(CACHE, InferenceRequest("r", "m", messages=(ChatTurn("system", "X"),)))
    with pytest.raises(ApiError, match="only prefix a chat"):
        ExplicitCaches.apply(CACHE, InferenceRequest("r", "m", prompt="text"))
    assert ExplicitCaches.cached_tokens(CACHE, 64) == 40 and ExplicitCaches.cached_tokens(CACHE, 32) == 32


def test_a_use_served_elsewhere_moves_the_cache() -> None:
    caches, reg = _caches()
    for replica in ("replica-1", "replica-2"):
        gen = SimpleNamespace(first=SimpleNamespace(decode_replica=replica))
        asyncio.run(caches.served(CACHE, gen))  # type: ignore[arg-type]
    assert reg.placed_calls == [("c1", "replica-2")]


def test_expiry_asks_are_checked() -> None:
    caches, _ = _caches()
    assert caches._expiry(None, None, 100.0) is None
    assert caches._expiry("60s", None, 100.0) == 160.0
    assert caches._expiry(None, "1970-01-01T00:03:20Z", 100.0) == 200.0
    for ttl, expire, needle in (("60s", "1970-01-01T00:03:20Z", "not both"), ("0s", None, "future"),
                                (f"{caches.max_ttl_s + 1:.0f}s", None, "too far")):
        with pytest.raises(ApiError, match=needle):
            caches._expiry(ttl, expire, 100.0)
