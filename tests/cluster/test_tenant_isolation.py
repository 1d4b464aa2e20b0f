"""Tenant isolation of the prompt cache on a real local Ray cluster, on every API surface.

Two API keys (``auth.api_keys_file``) on one colocated replica (a random Llama somewhat
larger than the other modules' so a cache hit shows in the time to first token), deployed
twice: with
``cache.tenant_isolation: api_key`` (the default) key B never hits key A's cached blocks,
on text and token-id completions and on chat, streamed or not, and on Anthropic's
/v1/messages with the key as ``x-api-key`` (``cached_tokens`` is 0 in every usage field); with ``tenant_isolation: none`` the very same test expects the hit to
be shared, so it can tell the two apart. Then nothing a client, a Prometheus scraper or a
log reader can see (the GET endpoints, response headers, Ray's metrics export, the Ray
session's log files) carries a prompt, an API key, a tenant salt or any block hash of the
prompts, in any of its usual renderings.

Anonymous requests are not exercised here (the keys are required); ``cluster.tenancy``
gives them their own salt, ``"anonymous"``, which no key's ``"tenant-<hash>"`` salt can equal
(``tests/cluster/test_tenancy.py``).

Explicit caches (``/v1beta/cachedContents``) are private to the key that made them; that is
tested with the Gemini surface, in ``tests/cluster/test_explicit_caches.py``.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import deploy_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY_A, KEY_B = "sk-tenant-alpha-4b1d9e", "sk-tenant-bravo-7c2f0a"
BLOCK = 16
TTFT_PROMPT = 1500  # tokens: long enough that its prefill dominates the time to first token
# (surface, streamed): every way a prompt reaches the cache today.
SURFACES = [(s, stream) for s in ("completions-text", "completions-ids", "chat") for stream in (False, True)]
SURFACES.append(("anthropic", False))  # /v1/messages, its key sent as x-api-key


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama big enough that prefilling a long prompt takes a visible time on a CPU
    (the cache hit has to show in the time to first token), with a 2048-token context."""
    from tests.engine.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tenant-model"), hidden_size=256,
                           intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=2048)


@pytest.fixture(scope="module", params=["api_key", "none"])
def server(request, ray_cluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(url, isolation): one deployment per isolation mode, the same keys in both."""
    keys = tmp_path_factory.mktemp("tenant-keys") / "api_keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    settings = {
        "mode": "colocated",
        "mixed": {"num_replicas": 1},
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 512, "block_size": BLOCK},
        "auth": {"api_keys_file": str(keys)},
        "cache": {"tenant_isolation": request.param},
    }
    with deploy_app(f"kvferry-tenants-{request.param}", settings) as (url, _):
        yield url, request.param


def _prompt(tag: str, n: int = 120) -> str:
    """A prompt of ``n`` characters (about as many tokens: the tokenizer is byte-level) that
    nobody sent before: it starts with a fresh nonce, so not even its first block is cached."""
    text = f"{uuid.uuid4().hex} [{tag}] " + "tenants share replicas, never blocks. " * (n // 38 + 1)
    return text[:n]


def _body(surface: str, prompt: str, stream: bool, reference_engine: Any) -> tuple[str, dict[str, Any]]:
    common: dict[str, Any] = {"model": reference_engine.model_id, "max_tokens": 2, "temperature": 0}
    if stream:
        common |= {"stream": True, "stream_options": {"include_usage": True}}
    if surface == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    if surface == "anthropic":
        return "/v1/messages", {**common, "messages": [{"role": "user", "content": prompt}]}
    tokens: Any = prompt if surface == "completions-text" else reference_engine.encode(prompt)
    return "/v1/completions", {**common, "prompt": tokens}


def _send(url: str, key: str, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float, httpx.Headers]:
    """(usage, seconds to the first token, headers) of one request."""
    headers = {"x-api-key": key} if path == "/v1/messages" else {"authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    if not body.get("stream"):
        r = httpx.post(url + path, json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        if path == "/v1/messages":  # Anthropic's usage, in the OpenAI terms the checks use
            read = usage["cache_read_input_tokens"]
            prompt = usage["input_tokens"] + usage["cache_creation_input_tokens"] + read
            usage = {"prompt_tokens": prompt, "prompt_tokens_details": {"cached_tokens": read}}
        return usage, time.monotonic() - t0, r.headers
    usage, ttft = None, None
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and ttft is None:
                ttft = time.monotonic() - t0
            usage = event.get("usage") or usage
        assert usage is not None, "no usage event with stream_options.include_usage"
        return usage, ttft or 0.0, r.headers


def _cached(usage: dict[str, Any]) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize(("surface", "stream"), SURFACES, ids=[f"{s}-{'stream' if st else 'json'}" for s, st in SURFACES])
def test_another_key_never_hits_my_prompt_cache(server, reference_engine, surface: str, stream: bool) -> None:
    url, isolation = server
    path, body = _body(surface, _prompt(surface), stream, reference_engine)
    first, _, _ = _send(url, KEY_A, path, body)
    again, _, _ = _send(url, KEY_A, path, body)
    other, _, _ = _send(url, KEY_B, path, body)
    other_again, _, _ = _send(url, KEY_B, path, body)
    assert _cached(first) == 0
    assert _cached(again) >= BLOCK * (first["prompt_tokens"] // BLOCK - 1)  # A's own cache works
    if isolation == "api_key":
        assert _cached(other) == 0, "key B hit key A's cached blocks"
        assert _cached(other_again) == _cached(again)  # ... and B's own cache works too
    else:  # tenant_isolation: none shares one cache, so this test tells the modes apart
        assert _cached(other) == _cached(again) > 0


def test_time_to_first_token_shows_the_hit_only_to_its_own_tenant(server, reference_engine) -> None:
    """The timing side channel, measured: a hit makes the first token come sooner. Key B's
    first request for A's prompt must look (and be) uncached unless the cache is shared."""
    url, isolation = server
    runs: dict[str, list[float]] = {"A uncached": [], "A cached": [], "B after A": []}
    for i in range(5):
        path, body = _body("completions-text", _prompt(f"ttft {i}", TTFT_PROMPT), True, reference_engine)
        for label, key in (("A uncached", KEY_A), ("A cached", KEY_A), ("B after A", KEY_B)):
            usage, ttft, _ = _send(url, key, path, body)
            runs[label].append(ttft)
            if label == "B after A":
                assert (_cached(usage) == 0) == (isolation == "api_key"), usage
    medians = {label: statistics.median(v) * 1000 for label, v in runs.items()}
    print(f"[measured] tenant_isolation={isolation}, {TTFT_PROMPT}-token prompt, TTFT median of 5 (ms): "
          + ", ".join(f"{label} {ms:.1f}" for label, ms in medians.items()))


# --------------------------------------------------------------------------- nothing leaks


def _forbidden(prompts: list[str], ids: list[list[int]], model_id: str) -> list[tuple[str, str]]:
    """Every (what, string) that must never be readable: prompts, keys, salts, and every block
    hash of every prompt under every salt, as decimal, hex, zero-padded hex and 0x-hex."""
    from cluster.tenancy import ANONYMOUS, cache_salt
    from engine.block_hash import hash_prompt_blocks

    out = [(f"prompt {i}", p[:40]) for i, p in enumerate(prompts)] + [("key A", KEY_A), ("key B", KEY_B)]
    salts = [cache_salt(KEY_A), cache_salt(KEY_B), ANONYMOUS, None]
    out += [(f"salt of key {k}", s) for k, s in zip("AB", salts)]
    for salt in salts:
        for n, token_ids in enumerate(ids):
            for j, h in enumerate(hash_prompt_blocks(token_ids, BLOCK, model_id, salt)):
                out += [(f"hash of block {j} of prompt {n} (salt {salt}) as {form}", form)
                        for form in sorted({str(h), f"{h:x}", f"{h:032x}", f"{h:#x}"})]
    return out


def _ray_logs() -> dict[str, str]:
    """Every log file of this Ray session (drivers, workers, replicas, Serve's access logs)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return {f"log {p.name}": p.read_bytes().decode("utf-8", "replace") for p in logs.rglob("*") if p.is_file()}


def _ray_metrics() -> str:
    """Everything Ray's metrics agent exports on this node (what Prometheus would scrape)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text


def test_no_endpoint_header_metric_or_log_exposes_prompts_hashes_or_keys(server, reference_engine) -> None:
    url, _ = server
    chat = _prompt("leak chat")
    text = _prompt("leak text")
    seen: list[str] = []
    for key in (KEY_A, KEY_B):
        for surface, prompt in (("chat", chat), ("completions-text", text), ("completions-ids", text)):
            for stream in (False, True):
                path, body = _body(surface, prompt, stream, reference_engine)
                _, _, headers = _send(url, key, path, body)
                seen.append(json.dumps(dict(headers)))
    auth = {"authorization": f"Bearer {KEY_A}"}
    for get in ("/health", "/v1/models", "/openapi.json", "/docs"):
        r = httpx.get(url + get, headers=auth, timeout=60)
        assert r.status_code == 200, (get, r.text)
        seen.append(r.text + json.dumps(dict(r.headers)))
    ids = [reference_engine.encode_chat([{"role": "user", "content": chat}]), reference_engine.encode(text)]
    forbidden = _forbidden([chat, text], ids, reference_engine.model_id)
    assert len(forbidden) > 100  # prompts, keys, salts, and each form of each hash (2 prompts x 7+ blocks x 4 salts)
    # Ray exports replica metrics every few seconds: wait until this test's requests are in.
    deadline, metrics = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        metrics = _ray_metrics()
        if "kvferry_requests_total" in metrics and "kvferry_api_requests_total" in metrics:
            break
        time.sleep(2)
    assert "kvferry_requests_total" in metrics, "Ray's metrics export has no kvferry metrics to check"
    time.sleep(1.0)  # log lines are flushed by the workers
    everything = {"metrics": metrics, **{f"response {i}": s for i, s in enumerate(seen)}, **_ray_logs()}
    leaks = [(what, where) for what, needle in forbidden for where, hay in everything.items() if needle in hay]
    assert leaks == [], leaks[:10]
    print(f"[measured] {len(forbidden)} forbidden strings checked against {len(metrics)} bytes of metrics, "
          f"{len(seen)} responses and {len(everything) - len(seen) - 1} log files: none found")
