"""Hostile request bodies and the messages they get, through a bare FastAPI app (no Ray).

The app is wired like the ingress (``JsonBodyRoute``, the OpenAI error handlers,
``document_api``) around the real request models; ``tests/cluster/test_api_hostile_inputs.py``
sends the same bodies to a live cluster.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cluster.http_body import JsonBodyRoute, parse_json_body
from cluster.http_errors import ERROR_RESPONSES, install_error_handlers
from cluster.openapi_doc import document_api, sse_response
from cluster.protocol import ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, CompletionResponse

JSON = {"content-type": "application/json"}
DEEP = 100_000


def _app() -> FastAPI:
    app = FastAPI()
    app.router.route_class = JsonBodyRoute
    install_error_handlers(app)
    document_api(app, event_models=(ChatCompletionChunk, CompletionResponse))

    @app.post("/c", responses={**ERROR_RESPONSES, **sse_response(CompletionResponse)})
    async def completions(req: CompletionRequest) -> dict:
        return {"ok": True}

    @app.post("/chat", responses=sse_response(ChatCompletionChunk))
    async def chat(req: ChatCompletionRequest) -> dict:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_app(), raise_server_exceptions=False)


def _error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"hello"', "must be a JSON object, got a string"),
        (b"null", "must be a JSON object, got null"),
        (b"42", "must be a JSON object, got a number"),
        (b"", "the request body is empty"),
        (b'{"model": "m", "prompt": "caf\xe9"}', "not valid UTF-8: byte 0xe9 at offset 29"),
        (b'{"model": "m", "prompt": "hi"', "not valid JSON: Expecting ',' delimiter (line 1, column 30)"),
        (b'{"model": "m", "prompt": "hi", "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"model": "m", "prompt": "hi", "top_p": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"model": "m", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
        (b'{"model": "m", "prompt": "\\ud800 alone"}', "unpaired UTF-16 surrogate"),
        (b'{"model": "m\\udfff", "prompt": "hi"}', "unpaired UTF-16 surrogate"),
        (b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
        (b'{"x": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}", "nested too deeply"),
    ],
)
def test_bodies_that_are_not_a_json_object_say_why(client: TestClient, body: bytes, message: str) -> None:
    t0 = time.monotonic()
    err = _error(client.post("/c", content=body, headers=JSON))
    assert message in err["message"], err
    assert time.monotonic() - t0 < 2.0  # a 100 000-level document is one failed parse, not a hang


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00", "k": "\\\\ud800"}') == {"prompt": "\U0001f600", "k": "\\ud800"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_sent_as_json_is_refused_by_name(client: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    err = _error(client.post("/c", content=b'{"model": "m", "prompt": "hi"}', headers=headers))
    assert "Content-Type: application/json" in err["message"]
    assert repr(content_type) in err["message"] if content_type else "no Content-Type" in err["message"]
    # JSON under a vendor type is JSON; a charset parameter is fine.
    for ok in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert client.post("/c", content=b'{"model": "m", "prompt": "hi"}', headers={"content-type": ok}).json() == {"ok": True}


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/c", {"prompt": "hi", "max_tokens": "2"}, "max_tokens", "valid integer"),
        ("/c", {"prompt": "hi", "stream": "true"}, "stream", "valid boolean"),
        ("/c", {"prompt": "hi", "temperature": "1e400"}, "temperature", "finite number"),
        ("/c", {"prompt": "hi", "n": 2}, "n", "less than or equal to 1"),
        ("/c", {"prompt": ""}, "prompt", "at least 1 character"),
        ("/c", {"prompt": 5}, "prompt", "valid string or Input should be a valid list"),
        ("/c", {"prompt": [1, True]}, "prompt.1", "valid integer"),
        ("/c", {"prompt": "hi", "stop": ["a", ""]}, "stop.1", "at least 1 character"),
        ("/c", {"prompt": "hi", "logit_bias": {"-4": 1}}, "logit_bias.-4", "pattern"),
        ("/chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content.0.type", "Input should be 'text'"),
        ("/chat", {"messages": [{"role": "user", "content": {"a": 1}}]}, "messages.0.content", "valid string or"),
        ("/chat", {"messages": ["hi"]}, "messages.0", "Input should be a JSON object"),
        ("/chat", {"messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
        ("/chat", {"messages": [{"role": "function", "content": "hi"}]}, "messages.0.role", "'user'"),
        ("/chat", {"messages": {"role": "user"}}, "messages", "valid list"),
    ],
)
def test_field_errors_name_the_field_as_the_client_sent_it(client: TestClient, path, body, param, message) -> None:
    """pydantic's union tags (``stop.constrained-str``, ``content.list[ContentPart]``) and
    ``[key]`` never reach the client: ``param`` is a path into the body it sent."""
    raw = json.dumps({"model": "m", **body}).replace('"1e400"', "1e400")  # overflows to inf when read
    err = _error(client.post(path, content=raw, headers=JSON))
    assert err["param"] == param, err
    assert err["message"].startswith(f"{param}: ") and message in err["message"], err


def test_the_schema_documents_the_event_stream_and_no_422(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert '"422"' not in json.dumps(schema)
    stream = schema["paths"]["/chat"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data = stream["properties"]["data"]["anyOf"]
    assert data[0] == {"const": "[DONE]", "description": data[0]["description"]}
    refs = [r["$ref"] for r in data[1]["contentSchema"]["anyOf"]]
    assert refs == ["#/components/schemas/ChatCompletionChunk", "#/components/schemas/ErrorResponse"]
    components = schema["components"]["schemas"]
    for name in ("ChatCompletionChunk", "ChatChunkChoice", "DeltaMessage", "ErrorResponse", "CompletionResponse"):
        assert name in components, name
    # Chat events leave out None fields: nothing with a default may be required in them.
    assert components["DeltaMessage"].get("required", []) == []
    from openapi_schema_validator import OAS31Validator

    for sub in components.values():
        OAS31Validator.check_schema(sub)  # each component is a valid OpenAPI 3.1 schema
