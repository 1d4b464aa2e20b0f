"""The explicit-cache registry as a named, async Ray actor (a thin shell over the plain class).

One per application (``kvferry-explicit-caches-<app>``), detached, so every ingress
replica and every decode replica of the app finds the same one with :func:`get_registry`.
Wall-clock time (``time.time``): the engines pin with the same clock (``SERVING_CLOCK``).

The registry lives in the actor's memory: if the actor dies, Ray restarts it empty, and
the decode replicas release every pin at their next sync (the caches are gone, and their
names answer 404). Clients re-create them, as after an expiry.
"""

from __future__ import annotations

import time

import ray

from cluster.explicit_caches import BudgetExceeded, ExplicitCache, ExplicitCacheRegistry, RegistryStats

REGISTRY_NAMESPACE = "kvferry"


def registry_name(app_name: str) -> str:
    return f"kvferry-explicit-caches-{app_name}"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class ExplicitCacheActor:
    """Async actor: every method runs on one event loop, so the plain class needs no lock.

    Refusals come back as values (``BudgetExceeded`` message strings), never as raised
    errors across the handle."""

    def __init__(self, budget_tokens: int) -> None:
        self._reg = ExplicitCacheRegistry(budget_tokens)

    async def reserve(self, cache: ExplicitCache) -> str | None:
        """None when recorded, else why not (the owner's budget)."""
        try:
            self._reg.reserve(cache, time.time())
        except BudgetExceeded as e:
            return str(e)
        return None

    async def placed(self, cache_id: str, replica_id: str) -> ExplicitCache | None:
        return self._reg.placed(cache_id, replica_id, time.time())

    async def get(self, cache_id: str, owner: str) -> ExplicitCache | None:
        return self._reg.get(cache_id, owner, time.time())

    async def list(self, owner: str, page_size: int, page_token: str) -> tuple[list[ExplicitCache], str] | str:
        """A page, or the error message of a bad page token."""
        try:
            return self._reg.list(owner, time.time(), page_size, page_token)
        except ValueError as e:
            return str(e)

    async def set_expiry(self, cache_id: str, owner: str, expires_at: float) -> ExplicitCache | None:
        return self._reg.set_expiry(cache_id, owner, expires_at, time.time())

    async def delete(self, cache_id: str, owner: str) -> bool:
        return self._reg.delete(cache_id, owner, time.time())

    async def drop(self, cache_id: str) -> None:
        self._reg.drop(cache_id)

    async def live(self, pin_ids: list[str], replica_id: str) -> dict[str, float]:
        return self._reg.live(pin_ids, replica_id, time.time())

    async def stats(self) -> RegistryStats:
        return self._reg.stats(time.time())


def get_registry(app_name: str, budget_tokens: int) -> ray.actor.ActorHandle:
    """The app's registry actor, created (detached) if it does not exist. Non-blocking."""
    return ExplicitCacheActor.options(
        name=registry_name(app_name), namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached",
    ).remote(budget_tokens)
