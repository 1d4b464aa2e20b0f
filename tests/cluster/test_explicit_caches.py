"""Gemini-style explicit caches and prompt_cache_key routing on a real local Ray cluster.

One colocated app (two ``mixed`` replicas of a tiny random Llama, API keys required, a
small per-key budget of pinned tokens), called with the real google-genai SDK and httpx:
create / get / list / patch / delete; a request using the cache reports cached tokens
(``cachedContentTokenCount``, ``cached_tokens``) and the same greedy text as sending the
whole prompt; another key gets the 404 of a missing cache; a key over its budget gets a
429 in Google's shape; bad inputs get Google-shaped 400s; and requests sharing a
``prompt_cache_key`` land on one decode replica. Engine-level behaviour (pins survive
pressure, fixed expiry with no refresh on hit, the engine-wide cap) is
``tests/engine/test_pins.py``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import deploy_app

genai = pytest.importorskip("google.genai")
from google.genai import errors as genai_errors  # noqa: E402
from google.genai import types  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY_A, KEY_B, KEY_C = "sk-gemini-alpha-31c9", "sk-gemini-bravo-8d02", "sk-gemini-charlie-55ae"
BUDGET = 700  # tokens per key: two of the budget test's ~260-token caches fit, a third does not


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    keys = tmp_path_factory.mktemp("gemini-keys") / "api_keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n{KEY_C}\n")
    settings = {
        "mode": "colocated",
        "mixed": {"num_replicas": 2},
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "block_size": 16},
        "auth": {"api_keys_file": str(keys)},
        "cache": {"explicit_cache_budget_tokens": BUDGET},
    }
    with deploy_app("kvferry-gemini", settings) as (url, _):
        model = httpx.get(url + "/v1/models", headers={"x-api-key": KEY_A}, timeout=60).json()["data"][0]["id"]
        yield url, model


_CLIENTS: dict[tuple[str, str], Any] = {}


def _client(url: str, key: str) -> Any:
    """One SDK client per key, kept alive (a collected Client closes the connection its
    sub-clients still use)."""
    if (url, key) not in _CLIENTS:
        _CLIENTS[(url, key)] = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=url,
                                                                                         api_version="v1beta"))
    return _CLIENTS[(url, key)]


def _system(tag: str, n: int = 200) -> str:
    text = f"{uuid.uuid4().hex} [{tag}] You are a ferry pilot who answers in riddles. " * 8
    return text[:n]


def _create(url: str, model: str, key: str, system: str, ttl: str = "600s") -> Any:
    return _client(url, key).caches.create(model=model, config=types.CreateCachedContentConfig(
        system_instruction=system, contents=[types.Content(role="user", parts=[types.Part(text="Remember.")])],
        ttl=ttl, display_name="ferry"))


def _gen_config(**kw: Any) -> Any:
    return types.GenerateContentConfig(temperature=0.0, max_output_tokens=8, **kw)


def test_create_get_list_patch_delete(server) -> None:
    url, model = server
    client = _client(url, KEY_A)
    t0 = time.time()
    cache = _create(url, model, KEY_A, _system("crud"))
    assert cache.name.startswith("cachedContents/") and cache.model == f"models/{model}"
    assert cache.display_name == "ferry" and cache.usage_metadata.total_token_count > 16
    assert 590 < cache.expire_time.timestamp() - t0 < 610
    got = client.caches.get(name=cache.name)
    assert (got.name, got.expire_time, got.usage_metadata.total_token_count) == (
        cache.name, cache.expire_time, cache.usage_metadata.total_token_count)
    assert cache.name in [c.name for c in client.caches.list(config=types.ListCachedContentsConfig(page_size=1))]
    updated = client.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="1200s"))
    assert 1190 < updated.expire_time.timestamp() - t0 < 1215 and updated.update_time >= cache.update_time
    client.caches.delete(name=cache.name)
    with pytest.raises(genai_errors.ClientError) as e:
        client.caches.get(name=cache.name)
    assert e.value.code == 404


def test_using_a_cache_hits_its_pinned_blocks_and_matches_the_whole_prompt(server) -> None:
    url, model = server
    system = _system("use")
    cache = _create(url, model, KEY_A, system)
    client = _client(url, KEY_A)
    question = "Which way is the river flowing?"
    used = client.models.generate_content(model=model, contents=question,
                                          config=_gen_config(cached_content=cache.name))
    usage = used.usage_metadata
    assert 0 < usage.cached_content_token_count <= cache.usage_metadata.total_token_count
    assert usage.prompt_token_count > usage.cached_content_token_count and usage.candidates_token_count == 8
    # The whole prompt from another tenant (whose salt shares no block with KEY_A's): same text.
    whole = _client(url, KEY_B).models.generate_content(
        model=model, contents=[types.Content(role="user", parts=[types.Part(text="Remember.")]),
                               types.Content(role="user", parts=[types.Part(text=question)])],
        config=_gen_config(system_instruction=system))
    assert whole.usage_metadata.cached_content_token_count == 0
    assert used.text == whole.text and used.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    streamed = list(client.models.generate_content_stream(model=model, contents=question,
                                                          config=_gen_config(cached_content=cache.name)))
    assert "".join(c.text or "" for c in streamed) == used.text
    # At least as much (the first use's own blocks may now cover the cache's partial last block).
    assert streamed[-1].usage_metadata.cached_content_token_count >= usage.cached_content_token_count
    # Chat completions with the cached_content extension: the same cache, replica and text.
    replicas = set()
    for _ in range(3):
        r = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"}, timeout=60,
                       json={"model": model, "max_tokens": 8, "temperature": 0, "cached_content": cache.name,
                             "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == used.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= usage.cached_content_token_count
        replicas.add(r.headers["x-kvferry-decode-replica"])
    assert len(replicas) == 1, f"uses of one pinned cache went to {replicas}"
    print(f"\n[measured] explicit cache of {cache.usage_metadata.total_token_count} tokens: a use of "
          f"{usage.prompt_token_count} prompt tokens had {usage.cached_content_token_count} cached; "
          f"the whole prompt under another key 0; 3 chat uses on one replica")


def test_a_cache_is_invisible_to_another_key(server) -> None:
    url, model = server
    cache = _create(url, model, KEY_A, _system("private"))
    missing = "cachedContents/" + "0" * 24
    answers = {}
    for name in (cache.name, missing):
        cid = name.split("/")[1]
        calls = {
            "get": ("GET", f"/v1beta/{name}", None),
            "patch": ("PATCH", f"/v1beta/{name}", {"ttl": "60s"}),
            "delete": ("DELETE", f"/v1beta/{name}", None),
            "use": ("POST", f"/v1beta/models/{model}:generateContent",
                    {"contents": [{"parts": [{"text": "hi"}]}], "cachedContent": name}),
        }
        for op, (method, path, body) in calls.items():
            r = httpx.request(method, url + path, json=body, headers={"x-goog-api-key": KEY_B}, timeout=60)
            assert r.status_code == 404, (op, r.text)
            answers[(op, name == missing)] = r.json()["error"]["message"].replace(cid, "ID")
            assert r.json()["error"]["status"] == "NOT_FOUND"
    for op in ("get", "patch", "delete", "use"):
        assert answers[(op, False)] == answers[(op, True)], op  # nothing tells "someone else's" from "none"
    assert cache.name not in [c.name for c in _client(url, KEY_B).caches.list()]
    print(f"\n[measured] explicit-cache isolation: {len(answers)} answers to key B, all 404 NOT_FOUND, "
          "someone else's cache indistinguishable from a missing one")
    assert _client(url, KEY_A).caches.get(name=cache.name).name == cache.name  # still there for its owner


def test_a_key_over_its_pinned_budget_gets_429(server) -> None:
    url, model = server
    made = []
    for i in range(4):
        try:
            made.append(_create(url, model, KEY_C, _system(f"budget-{i}", 240)))
        except genai_errors.ClientError as e:
            assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED" and "budget" in e.message
            break
    else:
        pytest.fail("no 429 within 4 caches")
    assert len(made) == 2 and sum(c.usage_metadata.total_token_count for c in made) <= BUDGET
    _client(url, KEY_C).caches.delete(name=made[0].name)
    made.append(_create(url, model, KEY_C, _system("budget-again", 240)))  # room again
    print(f"\n[measured] budget {BUDGET} tokens: two caches of {made[0].usage_metadata.total_token_count} tokens "
          "fit, the third got 429 RESOURCE_EXHAUSTED, and after a delete another one fit")


@pytest.mark.parametrize(("method", "path", "body", "status", "needle"), [
    ("POST", "/v1beta/cachedContents", {"model": "MODEL", "contents": [{"parts": [{"text": "x" * 40}]}]}, 400,
     "models/{name}"),
    ("POST", "/v1beta/cachedContents", {"model": "models/nope", "contents": [{"parts": [{"text": "x" * 40}]}]}, 404,
     "nope"),
    ("POST", "/v1beta/cachedContents", {"model": "models/MODEL", "contents": [{"parts": [{"text": "x" * 40}]}],
                                        "ttl": "ten minutes"}, 400, "ttl"),
    ("POST", "/v1beta/cachedContents", {"model": "models/MODEL", "contents": [{"parts": [{"text": "x"}]}]}, 400,
     "at least"),
    ("POST", "/v1beta/cachedContents", {"model": "models/MODEL", "contents": [{"parts": [{"inlineData": {}}]}]}, 400,
     "text parts"),
    ("PATCH", "/v1beta/cachedContents/abc", {"displayName": "renamed"}, 400, "only ttl or expireTime"),
    ("POST", "/v1beta/models/MODEL:generateContent", {"contents": []}, 400, "contents"),
    ("GET", "/v1beta/cachedContents?pageToken=bogus", None, 400, "pageToken"),
])
def test_bad_requests_get_google_shaped_errors(server, method, path, body, status, needle) -> None:
    url, model = server
    if body is not None and "model" in body:
        body = {**body, "model": body["model"].replace("MODEL", model)}
    path, _, query = path.replace("MODEL", model).partition("?")
    params = dict(p.split("=") for p in query.split("&") if p) | {"key": KEY_A}
    r = httpx.request(method, url + path, json=body, params=params, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["status"] in ("INVALID_ARGUMENT", "NOT_FOUND") and needle in err["message"]


def test_missing_key_is_a_google_shaped_401(server) -> None:
    url, _ = server
    r = httpx.get(url + "/v1beta/cachedContents", timeout=60)
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    assert httpx.get(url + "/v1beta/cachedContents", params={"key": KEY_A}, timeout=60).status_code == 200


def test_requests_sharing_a_prompt_cache_key_share_a_replica(server) -> None:
    url, model = server
    headers = {"authorization": f"Bearer {KEY_A}"}
    placed: dict[str, set[str]] = {}
    for k in range(4):
        key = f"conversation-{uuid.uuid4().hex}"
        for i in range(3):  # different prompts (nothing shared but the key)
            r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
                "model": model, "max_tokens": 2, "temperature": 0, "prompt_cache_key": key,
                "messages": [{"role": "user", "content": f"{uuid.uuid4().hex} question {i} of key {k}"}]})
            assert r.status_code == 200, r.text
            placed.setdefault(key, set()).add(r.headers["x-kvferry-decode-replica"])
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
