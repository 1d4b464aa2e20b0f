"""Hostile inputs on a real local Ray cluster: each gets a 400 in OpenAI's shape whose message
says what is wrong, and the server keeps serving everyone else meanwhile.

Extends ``test_hostile_requests.py`` (which covers over-size bodies, the cache-TTL and
``logit_bias`` range, five stop strings, an unknown role, empty messages and bad prompts):
deeply nested JSON, invalid UTF-8, lone surrogates, NaN, numbers with thousands of digits,
bodies that are not objects or not JSON, ``n`` / ``max_tokens`` / ``stop`` / ``logit_bias``
out of range, token ids outside the vocabulary, malformed messages. One colocated replica
(tiny random Llama, vocabulary of 320, 128-token context) serves the module: ``colocated_server``,
the app test_api_fuzz.py runs just before, reused rather than deployed again.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VOCAB = 320  # tests.engine.tiny_models.VOCAB_SIZE
DEEP = 100_000
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server(colocated_server: str) -> str:
    """The colocated tiny-model app this module shares with test_api_fuzz.py."""
    return colocated_server


@pytest.fixture(scope="module")
def model_name(server: str) -> str:
    return httpx.get(server + "/v1/models", timeout=60).json()["data"][0]["id"]


def _raw(fields: str) -> bytes:
    """A completions body with ``fields`` spliced in as raw JSON text (for what json.dumps won't write)."""
    return ('{"model": "MODEL", "prompt": "hi", "max_tokens": 2, ' + fields + "}").encode()


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": 2, **fields}).encode()


def _chat(messages: Any, **fields: Any) -> bytes:
    return json.dumps({"model": "MODEL", "messages": messages, "max_tokens": 2, **fields}).encode()


_USER = [{"role": "user", "content": "hi"}]
# (id, route, body with MODEL for the served name, content type, expected param, words the message must have)
HOSTILE: list[tuple[str, str, bytes, str | None, str | None, str]] = [
    ("deep-arrays", COMPLETIONS, _raw('"x": ' + "[" * DEEP + "]" * DEEP), "application/json", None, "nested too deeply"),
    ("deep-objects-in-messages", CHAT,
     b'{"model": "MODEL", "messages": [{"role": "user", "content": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}]}",
     "application/json", None, "nested too deeply"),
    ("invalid-utf8", COMPLETIONS, b'{"model": "MODEL", "prompt": "caf\xe9 \xff\xfe"}', "application/json", None,
     "not valid UTF-8: byte 0xe9"),
    ("lone-surrogate-model", COMPLETIONS, b'{"model": "x\\ud800", "prompt": "hi"}', "application/json", None,
     "unpaired UTF-16 surrogate"),
    ("lone-surrogate-prompt", CHAT, b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\udc00"}]}',
     "application/json", None, "unpaired UTF-16 surrogate"),
    ("nan", COMPLETIONS, _raw('"temperature": NaN'), "application/json", None, "NaN is not a JSON number"),
    ("5000-digit-int", COMPLETIONS, _raw('"seed": ' + "7" * 5000), "application/json", None, "more than 4300 digits"),
    ("float-overflow", COMPLETIONS, _raw('"top_p": 1e400'), "application/json", "top_p", "finite number"),
    ("body-array", CHAT, b"[1, 2, 3]", "application/json", None, "must be a JSON object, got an array"),
    ("body-string", CHAT, b'"hello"', "application/json", None, "must be a JSON object, got a string"),
    ("body-null", COMPLETIONS, b"null", "application/json", None, "must be a JSON object, got null"),
    ("body-empty", COMPLETIONS, b"", "application/json", None, "the request body is empty"),
    ("text-plain", COMPLETIONS, _completion(), "text/plain", None, "must be JSON (Content-Type: application/json)"),
    ("form", CHAT, b"model=MODEL&prompt=hi", "application/x-www-form-urlencoded", None, "Content-Type"),
    ("no-content-type", CHAT, _chat(_USER), None, None, "got no Content-Type"),
    ("n-2", COMPLETIONS, _completion(n=2), "application/json", "n", "less than or equal to 1"),
    ("n-huge", CHAT, _chat(_USER, n=10**30), "application/json", "n", "less than or equal to 1"),
    ("max-tokens-0", COMPLETIONS, _completion(max_tokens=0), "application/json", "max_tokens", "greater than or equal to 1"),
    ("max-tokens-string", COMPLETIONS, _completion(max_tokens="2"), "application/json", "max_tokens", "valid integer"),
    ("max-tokens-huge", CHAT, _chat(_USER, max_tokens=10**30), "application/json", "messages",
     "exceeds this model's context"),
    ("stop-empty", COMPLETIONS, _completion(stop=""), "application/json", "stop", "at least 1 character"),
    ("stop-empty-item", CHAT, _chat(_USER, stop=["ok", ""]), "application/json", "stop.1", "at least 1 character"),
    ("stop-number", COMPLETIONS, _completion(stop=5), "application/json", "stop", "valid string or"),
    ("logit-bias-outside-vocab", COMPLETIONS, _completion(logit_bias={str(VOCAB): 1}), "application/json",
     "logit_bias", f"logit_bias token ids must be in [0, {VOCAB})"),
    ("logit-bias-below-range", CHAT, _chat(_USER, logit_bias={"5": -101}), "application/json", "logit_bias.5",
     "greater than or equal to -100"),
    ("logit-bias-not-an-id", COMPLETIONS, _completion(logit_bias={"abc": 1}), "application/json", "logit_bias.abc",
     "pattern"),
    ("logit-bias-list", COMPLETIONS, _completion(logit_bias=[1, 2]), "application/json", "logit_bias", "JSON object"),
    ("token-id-vocab-size", COMPLETIONS, _completion(prompt=[1, 2, VOCAB]), "application/json", "prompt",
     f"prompt token ids must be in [0, {VOCAB})"),
    ("token-id-2^63", COMPLETIONS, _completion(prompt=[2**63]), "application/json", "prompt",
     f"prompt token ids must be in [0, {VOCAB})"),
    ("token-id-float", COMPLETIONS, _completion(prompt=[1, 2.5]), "application/json", "prompt.1", "valid integer"),
    ("messages-object", CHAT, _chat({"role": "user", "content": "hi"}), "application/json", "messages", "valid list"),
    ("message-string", CHAT, _chat(["hi"]), "application/json", "messages.0", "JSON object"),
    ("role-function", CHAT, _chat([{"role": "function", "content": "hi"}]), "application/json", "messages.0.role",
     "'user'"),
    ("role-null", CHAT, _chat([{"role": None, "content": "hi"}]), "application/json", "messages.0.role", "'user'"),
    ("content-object", CHAT, _chat([{"role": "user", "content": {"text": "hi"}}]), "application/json",
     "messages.0.content", "valid string or"),
    ("content-image", CHAT, _chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "application/json", "messages.0.content.0.type", "Input should be 'text'"),
    ("temperature-3", CHAT, _chat(_USER, temperature=3), "application/json", "temperature", "less than or equal to 2"),
    ("top-p-0", COMPLETIONS, _completion(top_p=0), "application/json", "top_p", "greater than 0"),
    ("stream-string", COMPLETIONS, _completion(stream="yes"), "application/json", "stream", "valid boolean"),
]


def _request(model_name: str, route: str, body: bytes, content_type: str | None) -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"method": "POST", "url": route, "content": body.replace(b"MODEL", model_name.encode()), "headers": headers}


@pytest.mark.parametrize(("route", "body", "content_type", "param", "words"),
                         [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_each_hostile_input_gets_a_400_that_says_what_is_wrong(server, model_name, route, body, content_type,
                                                                param, words) -> None:
    t0 = time.monotonic()
    with httpx.Client(base_url=server, timeout=60) as client:
        r = client.request(**_request(model_name, route, body, content_type))
    took = time.monotonic() - t0
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert words in err["message"], err
    assert err["param"] == param, err
    assert "Traceback" not in r.text and "pydantic" not in r.text
    assert took < 5.0, f"{took:.1f}s"


@pytest.mark.parametrize("fields", [{"seed": 10**30}, {"seed": -(10**30)}, {"top_k": 10**30},
                                    {"stop": "x" * 100_000}, {"prompt": "nul \u0000 byte"},
                                    {"prompt": [0, VOCAB - 1]}, {"temperature": 5e-324, "top_p": 5e-324}],
                         ids=["seed-huge", "seed-negative", "top-k-huge", "stop-100k", "nul", "last-token-id", "tiny"])
def test_odd_but_valid_inputs_are_served(server, model_name, fields) -> None:
    """Values the schema allows at its edges are served (none of them may become a 500)."""
    body = {"model": model_name, "prompt": "hi", "max_tokens": 3, "ignore_eos": True, **fields}
    r = httpx.post(server + COMPLETIONS, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


async def _bystander(client: httpx.AsyncClient, model_name: str, prompt: str) -> tuple[str, int, bool]:
    """A normal streamed completion: its text, tokens and whether it ended with [DONE]."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, tokens, done = "", 0, False
    async with client.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(c["text"] for c in event["choices"])
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return text, tokens, done


def test_everyone_else_is_served_correctly_during_the_barrage(server, model_name, reference_engine) -> None:
    """Every hostile input above, all at once, while two normal streams run: the streams get
    exactly the reference engine's tokens, and every hostile request still gets its 400."""
    from engine import SamplingParams

    prompts = ["the ferry crosses at dawn", "blocks of memory, one by one"]

    async def run() -> tuple[list[tuple[str, int, bool]], list[int]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            async def hostile(spec: tuple) -> int:
                await asyncio.sleep(0.2)  # the bystanders are streaming by now
                r = await client.request(**_request(model_name, spec[1], spec[2], spec[3]))
                return r.status_code

            results = await asyncio.gather(*(_bystander(client, model_name, p) for p in prompts),
                                           *(hostile(h) for h in HOSTILE))
            return list(results[: len(prompts)]), list(results[len(prompts):])

    t0 = time.monotonic()
    streams, statuses = asyncio.run(run())
    print(f"[measured] {len(HOSTILE)} hostile requests + {len(prompts)} streams at once: "
          f"{time.monotonic() - t0:.2f}s; statuses {sorted(set(statuses))}")
    assert statuses == [400] * len(HOSTILE)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for prompt, (text, tokens, done) in zip(prompts, streams):
        assert done and tokens == 64
        assert text == reference_engine.generate([prompt], params)[0].text
