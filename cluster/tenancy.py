"""Tenants for the prompt cache: who may hit whose cached blocks.

A provider must not let one customer's requests hit another's cache: a hit is visible in
``cached_tokens`` and in latency, which leaks whether someone else sent a prompt. The
ingress turns the request's API key into a *cache salt*, which the engine folds into the
root of every block-hash chain (``engine.block_hash.root_hash``). The same prompt
therefore maps to different blocks for different keys. The key itself never leaves the
ingress: only a one-way hash of it does.
"""

from __future__ import annotations

import xxhash

ANONYMOUS = "anonymous"


def api_key_from_headers(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The API key of a request: ``Authorization: Bearer KEY`` or Anthropic-style ``x-api-key``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def cache_salt(api_key: str | None, isolation: str = "api_key") -> str | None:
    """The engine's ``cache_salt`` for a request (None: the shared, unsalted cache)."""
    if isolation == "none":
        return None
    if isolation != "api_key":
        raise ValueError(f"unknown tenant isolation {isolation!r}; use api_key or none")
    if api_key is None:
        return ANONYMOUS
    return "tenant-" + xxhash.xxh3_128_hexdigest(api_key.encode())
