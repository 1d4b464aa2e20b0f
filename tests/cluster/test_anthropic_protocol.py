"""Anthropic Messages requests -> the surface-neutral request, and every error in Anthropic's
shape on the /v1/messages routes (a bare FastAPI app with the ingress's middlewares; no Ray)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.anthropic_protocol import TOOLS_HEADER, MessagesRequest
from cluster.anthropic_responses import stop_reason
from cluster.auth import ApiKeyAuth, ApiKeys
from cluster.error_shapes import render_error
from cluster.http_body import JsonBodyRoute
from cluster.http_errors import install_error_handlers
from cluster.http_limits import BodySizeLimit
from cluster.inference import CacheMark, ChatTurn
from cluster.wire import SERVER_OVERLOADED, ApiError, StreamChunk

ONE_H, FIVE_M = 3600.0, 300.0


def _req(**body) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **body})


def test_tools_system_and_messages_become_turns_with_breakpoints_in_cache_order() -> None:
    req = _req(
        tools=[{"name": "get_time", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        system=[{"type": "text", "text": "You are terse."},
                {"type": "text", "text": "Long manual.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                  {"role": "user", "content": [{"type": "text", "text": "again", "cache_control": {"type": "ephemeral"}}]}],
        temperature=0, top_k=5, stop_sequences=["\n\n"],
    ).to_generate("rid", "sk-a")
    tool = TOOLS_HEADER + '{"input_schema": {"type": "object"}, "name": "get_time"}'
    system = f"{tool}\n\nYou are terse.\n\nLong manual."
    assert req.messages == (ChatTurn("system", system), ChatTurn("user", "hi"), ChatTurn("assistant", "hello"),
                            ChatTurn("user", "again"))
    assert req.cache_marks == (CacheMark(0, len(tool), FIVE_M), CacheMark(0, len(system), ONE_H),
                               CacheMark(3, 5, FIVE_M))
    assert (req.surface, req.api_key, req.temperature, req.top_k, req.top_p, req.stop) == (
        "anthropic", "sk-a", 0.0, 5, 1.0, ("\n\n",))


def test_the_automatic_form_marks_the_end_of_the_last_message() -> None:
    req = _req(system="sys", messages=[{"role": "user", "content": "hello there"}],
               cache_control={"type": "ephemeral", "ttl": "1h"}).to_generate("rid", None)
    assert req.cache_marks == (CacheMark(1, len("hello there"), ONE_H),)
    assert (req.temperature, req.top_k) == (1.0, -1)  # Anthropic's defaults when not sent


def test_a_fifth_breakpoint_is_refused_with_anthropics_message() -> None:
    block = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    with pytest.raises(ApiError) as e:
        _req(system=[block] * 3, messages=[{"role": "user", "content": [block, block]}]).to_generate("rid", None)
    assert e.value.status_code == 400 and "maximum of 4 blocks with cache_control" in e.value.message


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "x"}]},  # no max_tokens
    {"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": 4, "messages": []},
    {"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
    {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5},
    {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "cache_control": {"type": "ephemeral",
                                                                                      "ttl": "2h"}},
])
def test_bad_bodies_are_400s_in_anthropics_shape(body: dict) -> None:
    r = _client().post("/v1/messages", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_stop_reasons() -> None:
    def chunk(reason: str, n: int, stop: str | None = None) -> StreamChunk:
        return StreamChunk("", (), True, reason, 10, n, 0, "local", "r", stop_string=stop)

    assert stop_reason(chunk("stop", 3), 8) == ("end_turn", None)
    assert stop_reason(chunk("stop", 3, "END"), 8) == ("stop_sequence", "END")
    assert stop_reason(chunk("length", 8), 8) == ("max_tokens", None)
    assert stop_reason(chunk("length", 5), 8) == ("model_context_window_exceeded", None)


def test_each_surface_renders_errors_its_own_way() -> None:
    status, body = render_error("/v1/messages", ApiError(404, "no such model", code="model_not_found"))
    assert (status, body) == (404, {"type": "error", "error": {"type": "not_found_error", "message": "no such model"}})
    status, body = render_error("/v1/messages/count_tokens", ApiError(503, "busy", code=SERVER_OVERLOADED))
    assert status == 529 and body["error"]["type"] == "overloaded_error"
    status, body = render_error("/v1/chat/completions", ApiError(503, "busy", code=SERVER_OVERLOADED))
    assert status == 503 and body["error"]["code"] == SERVER_OVERLOADED  # OpenAI's shape unchanged
    assert render_error("/v1/messagesX", ApiError(400, "x"))[1]["error"]["type"] == "invalid_request_error"
    assert "param" in render_error("/v1/messagesX", ApiError(400, "x"))[1]["error"]  # not Anthropic's


def _client(keys: ApiKeys | None = None, max_bytes: int = 1 << 20) -> TestClient:
    app = FastAPI()
    app.router.route_class = JsonBodyRoute
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=lambda: max_bytes)
    app.add_middleware(ApiKeyAuth, keys=lambda: keys or ApiKeys())

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest) -> dict:
        raise ApiError(503, "every replica is busy", code=SERVER_OVERLOADED)

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        return {}

    return TestClient(app, raise_server_exceptions=False)


def test_the_middlewares_answer_anthropic_routes_in_anthropics_shape() -> None:
    client = _client(ApiKeys(["sk-good"]), max_bytes=100)
    ok_body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    r = client.post("/v1/messages", json=ok_body, headers={"x-api-key": "sk-bad"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/messages", json={**ok_body, "pad": "x" * 200}, headers={"x-api-key": "sk-good"})
    assert r.status_code == 413 and r.json() == {"type": "error", "error": {
        "type": "request_too_large", "message": "the request body is larger than this server's limit of 100 bytes"}}
    r = client.post("/v1/messages", json=ok_body, headers={"x-api-key": "sk-good", "anthropic-version": "1999-01-01"})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]
    r = client.post("/v1/chat/completions", json={}, headers={"x-api-key": "sk-bad"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
