"""Explicit caches (Gemini ``cachedContents``) over the one request path: create, read,
list, update, delete, and their use by ``generateContent`` and chat completions.

Creating one runs its contents (system instruction + contents, rendered with the model's
chat template, without the assistant's opening) through :class:`FrontDoor` like any
request, one token long, asking the decode replica that serves it to *pin* the prompt's
blocks (``engine.pins``) until the cache's fixed expiry. The app's registry actor
(``cluster.explicit_cache_actor``) records the cache, its owner (a hash of the API key),
its length and the replica holding the blocks; it refuses a create over the owner's
token budget (429). A cache is visible only to its owner: for any other key it is a 404
with the very message of a missing one.

Using one prefixes the request's turns with the cache's turns, prefers the replica that
pins it (``RoutingHints.prefer_replica``) and asks that replica to keep the pin (a no-op
where it is already held). If that replica is gone, the request lands elsewhere, is
recomputed there and re-pinned, and the registry moves the cache to its new replica; the
old replica's pin, if it still lives, is released at its next sync (``cluster.pin_sync``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from cluster.explicit_cache_actor import get_registry
from cluster.explicit_caches import ExplicitCache, ExplicitCacheRegistry
from cluster.front_door import FrontDoor, Generation
from cluster.gemini_protocol import (
    CachedContent,
    CacheUsage,
    CreateCachedContent,
    ListCachedContents,
    UpdateCachedContent,
    format_time,
    parse_duration,
    parse_time,
    to_turns,
)
from cluster.inference import CachePin, InferenceRequest
from cluster.tenancy import owner_id
from cluster.wire import ApiError

RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
CACHE_PREFIX = "cachedContents/"
_MUTABLE = {"ttl", "expireTime", "expire_time"}


def _not_found(name: str) -> ApiError:
    # One message for missing, expired and someone else's: ids cannot be probed.
    return ApiError(404, f"CachedContent not found (or permission denied): {name}", param="name")


class ExplicitCaches:
    """The explicit-cache operations of one ingress replica."""

    def __init__(self, door: FrontDoor, registry: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.door = door
        cache = door.cfg.cache
        self.default_ttl_s = cache.explicit_cache_default_ttl_s
        self.max_ttl_s = cache.explicit_cache_max_ttl_s
        self._get_registry = registry or (lambda: get_registry(door.cfg.app_name, cache.explicit_cache_budget_tokens))
        self._registry: Any = None
        self.clock = clock

    @property
    def registry(self) -> Any:
        if self._registry is None:
            self._registry = self._get_registry()
        return self._registry

    # ------------------------------------------------------------------ resource views

    def view(self, c: ExplicitCache) -> CachedContent:
        return CachedContent(name=CACHE_PREFIX + c.cache_id, model="models/" + c.model, display_name=c.display_name,
                             create_time=format_time(c.create_time), update_time=format_time(c.update_time),
                             expire_time=format_time(c.expires_at), usage_metadata=CacheUsage(total_token_count=c.num_tokens))

    def _expiry(self, ttl: str | None, expire_time: str | None, now: float) -> float | None:
        """The absolute expiry asked for (None: neither given); 400 for a bad or too-long one."""
        if ttl is not None and expire_time is not None:
            raise ApiError(400, "set either ttl or expireTime, not both", param="ttl")
        if ttl is None and expire_time is None:
            return None
        expires_at = now + parse_duration(ttl) if ttl is not None else parse_time(expire_time or "")
        param = "ttl" if ttl is not None else "expireTime"
        if expires_at <= now:
            raise ApiError(400, f"{param} must lie in the future", param=param)
        if expires_at - now > self.max_ttl_s:
            raise ApiError(400, f"{param} is too far ahead: an explicit cache lives at most {self.max_ttl_s:g}s",
                           param=param)
        return expires_at

    # ------------------------------------------------------------------ CRUD

    async def create(self, body: CreateCachedContent, api_key: str | None, request_id: str) -> CachedContent:
        if not body.model.startswith("models/"):
            raise ApiError(400, f"model must be 'models/{{name}}', got {body.model!r}", param="model")
        model = body.model.removeprefix("models/")
        self.door.check_model(model)
        if not body.contents and body.system_instruction is None:
            raise ApiError(400, "an explicit cache needs contents or a systemInstruction", param="contents")
        now = self.clock()
        expires_at = self._expiry(body.ttl, body.expire_time, now) or now + self.default_ttl_s
        cache_id = ExplicitCacheRegistry.new_id()
        turns = to_turns(body.contents, body.system_instruction)
        req = InferenceRequest(request_id, model, messages=turns, prompt_param="contents", max_tokens=1,
                               temperature=0.0, api_key=api_key, surface="gemini", add_generation_prompt=False,
                               pin=CachePin(cache_id, expires_at))
        num_tokens = await self.door.count_tokens(req)
        block_size = (await self.door.model_info()).block_size
        if num_tokens < block_size:
            raise ApiError(400, f"the contents are {num_tokens} tokens; an explicit cache holds at least "
                           f"{block_size}", param="contents")
        entry = ExplicitCache(cache_id, owner_id(api_key), model, body.display_name, turns, num_tokens, now, now,
                              expires_at)
        refusal = await self.registry.reserve.remote(entry)
        if refusal is not None:
            raise ApiError(429, refusal, code=RESOURCE_EXHAUSTED)
        try:
            gen = await self.door.open(req)
            _, last = await gen.collect()
            if last.pinned_tokens == 0 and self.clock() >= expires_at:
                raise ApiError(400, f"the cache expired while it was being created ({self.clock() - now:.1f}s): "
                               "give it a longer ttl", param="ttl")
            if last.pinned_tokens == 0:
                raise ApiError(429, f"the server cannot pin this cache now: {last.pin_refusal}", code=RESOURCE_EXHAUSTED)
        except BaseException:
            await self.registry.drop.remote(cache_id)
            raise
        placed = await self.registry.placed.remote(cache_id, last.decode_replica)
        return self.view(placed or entry)

    async def get(self, cache_id: str, api_key: str | None) -> CachedContent:
        return self.view(await self._mine(cache_id, api_key))

    async def list(self, api_key: str | None, page_size: int, page_token: str) -> ListCachedContents:
        page = await self.registry.list.remote(owner_id(api_key), page_size, page_token)
        if isinstance(page, str):
            raise ApiError(400, page, param="pageToken")
        caches, token = page
        return ListCachedContents(cached_contents=[self.view(c) for c in caches], next_page_token=token or None)

    async def update(self, cache_id: str, body: UpdateCachedContent, update_mask: str | None,
                     api_key: str | None) -> CachedContent:
        others = set(body.model_extra or {}) | ({f.strip() for f in update_mask.split(",")} if update_mask else set())
        others -= _MUTABLE
        if others:
            raise ApiError(400, f"only ttl or expireTime can be updated, not {', '.join(sorted(others))}",
                           param=sorted(others)[0])
        expires_at = self._expiry(body.ttl, body.expire_time, self.clock())
        if expires_at is None:
            raise ApiError(400, "set ttl or expireTime", param="ttl")
        updated = await self.registry.set_expiry.remote(cache_id, owner_id(api_key), expires_at)
        if updated is None:
            raise _not_found(CACHE_PREFIX + cache_id)
        return self.view(updated)

    async def delete(self, cache_id: str, api_key: str | None) -> None:
        if not await self.registry.delete.remote(cache_id, owner_id(api_key)):
            raise _not_found(CACHE_PREFIX + cache_id)

    async def _mine(self, cache_id: str, api_key: str | None) -> ExplicitCache:
        entry = await self.registry.get.remote(cache_id, owner_id(api_key))
        if entry is None:
            raise _not_found(CACHE_PREFIX + cache_id)
        return entry

    # ------------------------------------------------------------------ use

    async def resolve(self, name: str, api_key: str | None, model: str, param: str) -> ExplicitCache:
        """The caller's cache named ``cachedContents/{id}`` (or just the id), for ``model``."""
        entry = await self._mine(name.removeprefix(CACHE_PREFIX), api_key)
        if entry.model != model:
            raise ApiError(400, f"the request's model ({model}) and the cached content's model ({entry.model}) "
                           "must be the same", param=param)
        return entry

    @staticmethod
    def apply(entry: ExplicitCache, req: InferenceRequest) -> InferenceRequest:
        """``req`` with the cache's turns first, routed to (and re-pinned on) its replica."""
        if req.messages is None:
            raise ApiError(400, "a cached content can only prefix a chat", param=req.prompt_param)
        if entry.turns and entry.turns[0].role == "system" and any(t.role == "system" for t in req.messages):
            raise ApiError(400, "a request using a cached content with a system instruction cannot set its own",
                           param="systemInstruction")
        return dataclasses.replace(req, messages=entry.turns + req.messages, prefer_replica=entry.replica_id or None,
                                   pin=CachePin(entry.cache_id, entry.expires_at, entry.num_tokens))

    async def served(self, entry: ExplicitCache, gen: Generation) -> None:
        """The request using ``entry`` started: if it landed on another replica (the pinning
        one died or was full), that replica re-pins the cache and now holds it."""
        if gen.first.decode_replica != entry.replica_id:
            await self.registry.placed.remote(entry.cache_id, gen.first.decode_replica)

    @staticmethod
    def cached_tokens(entry: ExplicitCache, engine_cached: int) -> int:
        """Prompt tokens served from the cache's content (never more than it holds)."""
        return min(engine_cached, entry.num_tokens)
