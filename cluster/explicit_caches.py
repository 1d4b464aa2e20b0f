"""The registry of explicit caches (Gemini ``cachedContents``): plain class, explicit clock.

Every ingress replica shares one registry (``cluster.explicit_cache_actor``); it is the
source of truth for which explicit caches exist. An entry records who owns the cache (a
one-way hash of the API key, never the key), its model and contents (chat turns), its
length in tokens, its fixed expiry, and which decode replica pins its blocks. Decode
replicas reconcile their engine's pins against it (:meth:`ExplicitCacheRegistry.live`):
a pin the registry no longer lists, or lists on another replica, is released there.

Per-tenant budget: the pinned tokens of one owner's unexpired caches may not exceed
``budget_tokens`` (``cache.explicit_cache_budget_tokens``): :meth:`reserve` refuses first.
A cache is visible only to its owner: for anyone else it does not exist (same answer as a
missing one, so ids cannot be probed).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from cluster.inference import ChatTurn


class BudgetExceeded(Exception):
    """The owner's explicit caches would pin more tokens than the per-tenant budget."""


@dataclass(frozen=True)
class ExplicitCache:
    """One explicit cache (times are wall-clock seconds)."""

    cache_id: str
    # Hash of the creating API key (``cluster.tenancy.owner_id``).
    owner: str
    model: str
    display_name: str
    # System instruction first (role "system"), then the contents, as chat turns.
    turns: tuple[ChatTurn, ...]
    # Prompt tokens of the cached contents (the tokens the budget counts).
    num_tokens: int
    create_time: float
    update_time: float
    expires_at: float
    # The decode replica holding the pinned blocks ("" until the creating request finished).
    replica_id: str = ""


@dataclass(frozen=True)
class RegistryStats:
    """Sizes and counters for metrics."""

    num_caches: int
    num_pinned_tokens: int
    num_expired: int


class ExplicitCacheRegistry:
    """Create, read, list, update, delete and expire explicit caches; pure, explicit ``now``."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self._caches: dict[str, ExplicitCache] = {}
        self.num_expired = 0

    @staticmethod
    def new_id() -> str:
        """A fresh, unguessable cache id."""
        return secrets.token_hex(12)

    def reserve(self, cache: ExplicitCache, now: float) -> ExplicitCache:
        """Record a cache being created (before its blocks are pinned), within budget."""
        self.sweep(now)
        used = sum(c.num_tokens for c in self._caches.values() if c.owner == cache.owner)
        if used + cache.num_tokens > self.budget_tokens:
            raise BudgetExceeded(
                f"this API key's explicit caches would hold {used + cache.num_tokens} tokens, over its budget of "
                f"{self.budget_tokens} ({used} in use); delete a cache or wait for one to expire"
            )
        if cache.cache_id in self._caches:
            raise ValueError(f"cache id {cache.cache_id} is taken")
        self._caches[cache.cache_id] = cache
        return cache

    def placed(self, cache_id: str, replica_id: str, now: float) -> ExplicitCache | None:
        """The blocks are pinned on ``replica_id`` (after creation, or a re-pin elsewhere)."""
        cache = self._caches.get(cache_id)
        if cache is None:
            return None
        self._caches[cache_id] = cache = replace(cache, replica_id=replica_id)
        return cache

    def get(self, cache_id: str, owner: str, now: float) -> ExplicitCache | None:
        """The owner's unexpired cache, else None (someone else's is None too)."""
        cache = self._caches.get(cache_id)
        if cache is None or cache.owner != owner or cache.expires_at <= now:
            return None
        return cache

    def list(self, owner: str, now: float, page_size: int, page_token: str = "") -> tuple[list[ExplicitCache], str]:
        """One page of the owner's caches, oldest first, and the next page's token ("" at the
        end). The token names the last cache returned, so deletions between pages skip none.
        ValueError for a token this method did not make."""
        mine = sorted((c for c in self._caches.values() if c.owner == owner and c.expires_at > now), key=_order)
        start = 0
        if page_token:
            last = _parse_token(page_token)
            start = next((i for i, c in enumerate(mine) if _order(c) > last), len(mine))
        page = mine[start:start + page_size]
        more = start + page_size < len(mine)
        return page, (f"{page[-1].create_time!r}_{page[-1].cache_id}" if more and page else "")

    def set_expiry(self, cache_id: str, owner: str, expires_at: float, now: float) -> ExplicitCache | None:
        """Move the owner's cache's fixed expiry (the only mutable field); None if not theirs."""
        cache = self.get(cache_id, owner, now)
        if cache is None:
            return None
        self._caches[cache_id] = cache = replace(cache, expires_at=expires_at, update_time=now)
        return cache

    def delete(self, cache_id: str, owner: str, now: float) -> bool:
        """Delete the owner's cache (its replica releases the blocks at its next sync)."""
        if self.get(cache_id, owner, now) is None:
            return False
        del self._caches[cache_id]
        return True

    def drop(self, cache_id: str) -> None:
        """Forget a cache whose creation failed (no owner check: the ingress reserved it)."""
        self._caches.pop(cache_id, None)

    def live(self, pin_ids: list[str], replica_id: str, now: float) -> dict[str, float]:
        """Of a replica's pins, those it should keep: ``{cache_id: expires_at}``. A cache
        still being created (no replica yet) is kept wherever it is pinned."""
        self.sweep(now)
        out = {}
        for pin_id in pin_ids:
            cache = self._caches.get(pin_id)
            if cache is not None and cache.replica_id in ("", replica_id):
                out[pin_id] = cache.expires_at
        return out

    def sweep(self, now: float) -> int:
        """Forget expired caches; how many."""
        gone = [cid for cid, c in self._caches.items() if c.expires_at <= now]
        for cid in gone:
            del self._caches[cid]
        self.num_expired += len(gone)
        return len(gone)

    def stats(self, now: float) -> RegistryStats:
        live = [c for c in self._caches.values() if c.expires_at > now]
        return RegistryStats(len(live), sum(c.num_tokens for c in live), self.num_expired)


def _order(cache: ExplicitCache) -> tuple[float, str]:
    return (cache.create_time, cache.cache_id)


def _parse_token(token: str) -> tuple[float, str]:
    when, _, cache_id = token.partition("_")
    try:
        return float(when), cache_id
    except ValueError:
        raise ValueError(f"pageToken {token!r} is not one this server returned") from None
