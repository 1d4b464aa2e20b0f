"""Traffic that makes every kvferry metric move: cold and cached prompts, a stream, an API
error, one injected KV-transfer failure, an explicit cache that expires, TTL expiries and
capacity evictions.

Used by the live-Prometheus test. Sent only to 127.0.0.1, bounded in count.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx

# ~250 tokens each with SmolLM2's tokenizer: long enough for the prefill pool (the local
# prefill threshold is far below) and for a few KV blocks each.
_SYSTEM = "You are assistant number {i}. You answer in one short sentence and never ramble. "


def system_prompt(i: int, repeat: int = 16) -> str:
    return (_SYSTEM.format(i=i)) * repeat


def chat(url: str, model: str, system: str, user: str, max_tokens: int = 8, stream: bool = False) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def warm_up(url: str, model: str) -> None:
    """A first request per pool, so every series exists before the measured traffic."""
    chat(url, model, system_prompt(0), "hello")


def traffic(url: str, model: str, inject_failure: Any, rounds: int = 1) -> dict[str, int]:
    """The measured traffic; ``inject_failure()`` makes the next KV transfer fail."""
    sent = {"cold": 0, "cached": 0, "stream": 0, "failed_transfer": 0, "api_errors": 0, "explicit_caches": 0}
    expires = []
    for r in range(rounds):
        # First, so that it expires while the rest runs (its lifetime is fixed).
        cache = explicit_cache(url, model, system_prompt(7000 + r), ttl="20s")
        expires.append(datetime.fromisoformat(cache["expireTime"]).timestamp())
        sent["explicit_caches"] += 1
        for i in range(1, 5):  # distinct system prompts: cold, then pushed out by the others
            chat(url, model, system_prompt(100 * r + i), "What is your number?")
            sent["cold"] += 1
        for q in ("Hi", "How are you?", "Name a colour."):  # one shared prefix: cache hits
            chat(url, model, system_prompt(1000), q)
            sent["cached"] += 1
        chat(url, model, system_prompt(1000), "Count to five.", max_tokens=16, stream=True)
        sent["stream"] += 1
        inject_failure()
        chat(url, model, system_prompt(5000 + r), "This one recomputes locally.")
        sent["failed_transfer"] += 1
        bad = httpx.post(url + "/v1/chat/completions", timeout=30,
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 404, bad.text
        sent["api_errors"] += 1
    time.sleep(max(0.0, max(expires) + 1.0 - time.time()))  # every explicit cache has expired
    return sent


def explicit_cache(url: str, model: str, system: str, ttl: str) -> dict[str, Any]:
    """A Gemini-style explicit cache of ``system`` (pinned on a decode replica until ``ttl``)."""
    body = {"model": f"models/{model}", "systemInstruction": {"parts": [{"text": system}]},
            "contents": [{"role": "user", "parts": [{"text": "Remember this."}]}], "ttl": ttl}
    r = httpx.post(url + "/v1beta/cachedContents", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def let_blocks_expire(url: str, model: str, ttl_s: float) -> None:
    """Wait out the TTL, then allocate: engines drop expired blocks when they allocate."""
    time.sleep(ttl_s + 1.0)
    chat(url, model, system_prompt(9000), "After the TTL.")
