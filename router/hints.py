"""Routing hints: what the ingress computes once per request for every router on its path.

The ingress hashes the prompt with ``engine.block_hash.hash_prompt_blocks`` (the engine's
own function, so keys agree) and passes a :class:`RoutingHints` along with the request,
either as an argument / keyword argument of the handle call, or as a ``routing_hints``
attribute of the request object. The Serve routers find it with :func:`find_hints`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.block_hash import BlockHash


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """A request's routing keys."""

    # Chained hashes of the prompt's full blocks.
    block_hashes: tuple[BlockHash, ...]
    # Prompt length in tokens.
    num_tokens: int
    # Tokens per block (the engine's block_size).
    block_size: int
    # OpenAI prompt_cache_key, hashed with the tenant's salt: requests sharing it share a replica.
    cache_key: str | None = None
    # The replica holding the request's pinned explicit cache: first whenever it can take it.
    prefer_replica: str | None = None


def find_hints(args: Iterable[Any], kwargs: dict[Any, Any]) -> RoutingHints | None:
    """The first RoutingHints among the call's arguments (or their ``routing_hints``)."""
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, RoutingHints):
            return v
        h = getattr(v, "routing_hints", None)
        if isinstance(h, RoutingHints):
            return h
    return None
