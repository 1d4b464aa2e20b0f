"""OpenAI protocol models and the error handlers, exercised through a bare FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from cluster.http_errors import install_error_handlers
from cluster.wire import ApiError
from cluster.inference import CacheMark, ChatTurn
from cluster.protocol import ChatCompletionRequest, CompletionRequest, Usage, parse_retention


def test_retention_mapping() -> None:
    assert parse_retention(None) is None
    assert parse_retention("in_memory") is None
    assert parse_retention("24h") == 86400.0
    assert parse_retention("5m") == 300.0
    with pytest.raises(ValueError):
        parse_retention("forever")


def test_usage_carries_openai_and_deepseek_cache_fields() -> None:
    u = Usage.of(prompt_tokens=100, completion_tokens=5, cached_tokens=64).model_dump()
    assert u["prompt_tokens_details"]["cached_tokens"] == 64 and u["total_tokens"] == 105
    assert (u["prompt_cache_hit_tokens"], u["prompt_cache_miss_tokens"]) == (64, 36)


def test_chat_request_maps_to_the_surface_neutral_request() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "be brief",
                                                "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
                {"role": "user", "content": [{"type": "text", "text": "hi "},
                                             {"type": "text", "text": "there", "cache_control": {"type": "ephemeral"}}]},
            ],
            "max_completion_tokens": 5,
            "temperature": 0,
            "stop": "x",
            "prompt_cache_key": "conv-7",
            "logprobs": False,  # unknown OpenAI knobs are ignored
        }
    )
    inf = req.to_inference("r1", "key", default_ttl_s=300.0)
    assert inf.max_tokens == 5 and inf.temperature == 0 and inf.stop == ("x",)
    assert inf.messages == (ChatTurn("system", "be brief"), ChatTurn("user", "hi there"))
    # Anthropic-style cache_control parts are breakpoints (message, characters up to the part's end, TTL).
    assert inf.cache_marks == (CacheMark(0, 8, 3600.0), CacheMark(1, 8, 300.0))
    assert inf.cache_ttl_s is None and inf.prompt_cache_key == "conv-7" and inf.api_key == "key"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "hi", "max_tokens": 0},
        {"model": "m", "prompt": "hi", "max_tokens": "many"},
        {"model": "m", "prompt": ""},
        {"model": "m"},
        {"model": "m", "prompt": "hi", "prompt_cache_retention": "forever"},
    ],
)
def test_bad_completion_bodies_are_rejected(body: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/c")
    async def c(req: CompletionRequest) -> dict:
        if req.model != "m":
            raise ApiError(404, f"model {req.model} not found", code="model_not_found")
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internal detail")

    return app


def test_error_handlers_shape_every_error() -> None:
    client = TestClient(_app(), raise_server_exceptions=False)
    r = client.post("/c", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/c", json={"model": "m", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/c", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.get("/boom")
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.post("/c", json={"model": "m", "prompt": "x"}).json() == {"ok": True}


def test_kvferry_error_survives_pickling() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(ApiError(503, "no prefill", code="PREFILL_POOL_UNAVAILABLE")))
    assert e.status_code == 503 and e.code == "PREFILL_POOL_UNAVAILABLE" and e.type == "service_unavailable"


def test_usage_carries_the_cached_tokens_split_by_tier() -> None:
    from cluster.protocol import Usage
    from engine.outputs import TokensByTier

    u = Usage.of(100, 5, 48, TokensByTier(device=16, host=16, disk=16)).model_dump()
    assert u["prompt_tokens_details"] == {"cached_tokens": 48}  # the total, as OpenAI defines it
    assert u["kvferry"] == {"cached_tokens_by_tier": {"device": 16, "host": 16, "disk": 16}}
    # Without a split (an older replica), every cached token counts as a device hit.
    assert Usage.of(10, 1, 8).model_dump()["kvferry"]["cached_tokens_by_tier"] == {"device": 8, "host": 0, "disk": 0}
