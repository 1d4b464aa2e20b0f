"""Tenants for the prompt cache: who may hit whose cached blocks.

A provider must not let one customer's requests hit another's cache: a hit is visible in
``cached_tokens`` and in latency, which leaks whether someone else sent a prompt. The
ingress turns the request's API key into a *cache salt*, which the engine folds into the
root of every block-hash chain (``engine.block_hash.root_hash``). The same prompt
therefore maps to different blocks for different keys. The key itself never leaves the
ingress: only a one-way hash of it does.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import xxhash

ANONYMOUS = "anonymous"
# Gemini clients send their key as ``x-goog-api-key`` or ``?key=``, on these paths only.
GOOGLE_PATH_PREFIX = "/v1beta/"


def api_key_from_headers(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The API key of a request: ``Authorization: Bearer KEY`` or Anthropic-style ``x-api-key``."""
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def google_api_key(x_goog_api_key: str | None, query_string: bytes | str = b"") -> str | None:
    """Gemini's key: the ``x-goog-api-key`` header, else the ``key`` query parameter."""
    if x_goog_api_key and x_goog_api_key.strip():
        return x_goog_api_key.strip()
    qs = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    values = parse_qs(qs).get("key")
    return values[0].strip() if values and values[0].strip() else None


def owner_id(api_key: str | None) -> str:
    """Who owns an explicit cache: a one-way hash of the API key (whatever the isolation
    setting: a cache is always private to the key that made it)."""
    return cache_salt(api_key, "api_key") or ANONYMOUS


def cache_salt(api_key: str | None, isolation: str = "api_key") -> str | None:
    """The engine's ``cache_salt`` for a request (None: the shared, unsalted cache)."""
    if isolation == "none":
        return None
    if isolation != "api_key":
        raise ValueError(f"unknown tenant isolation {isolation!r}; use api_key or none")
    if api_key is None:
        return ANONYMOUS
    return "tenant-" + xxhash.xxh3_128_hexdigest(api_key.encode())
