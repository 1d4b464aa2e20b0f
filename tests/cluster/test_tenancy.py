"""Tenant salts: API keys map to distinct, stable, one-way cache salts."""

from __future__ import annotations

import pytest

from cluster.tenancy import ANONYMOUS, api_key_from_headers, cache_salt
from engine.block_hash import hash_prompt_blocks


def test_api_key_from_bearer_or_x_api_key() -> None:
    assert api_key_from_headers("Bearer sk-1") == "sk-1"
    assert api_key_from_headers("bearer  sk-2 ") == "sk-2"
    assert api_key_from_headers(None, "sk-3") == "sk-3"
    assert api_key_from_headers("Basic abc") is None
    assert api_key_from_headers("Bearer ") is None
    assert api_key_from_headers(None, None) is None


def test_salts_separate_tenants_and_hide_the_key() -> None:
    a, b = cache_salt("sk-alice"), cache_salt("sk-bob")
    assert a != b and a == cache_salt("sk-alice")
    assert "sk-alice" not in a
    assert cache_salt(None) == ANONYMOUS
    assert cache_salt("sk-alice", "none") is None
    with pytest.raises(ValueError):
        cache_salt("k", "per-user")
    # The salt reaches the block hashes: the same prompt gives disjoint keys per tenant.
    prompt = list(range(64))
    ha = hash_prompt_blocks(prompt, 16, "m", a)
    hb = hash_prompt_blocks(prompt, 16, "m", b)
    assert not set(ha) & set(hb)
