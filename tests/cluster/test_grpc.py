"""The gRPC surface (kvferry.v1.Inference) end to end, with a real grpcio client.

One colocated app (one mixed replica of a small random Llama, two API keys) reached through
Serve's gRPC proxy, the way `kvferry serve` starts it (``tests/cluster/conftest.deploy_app``).
Answers are checked token-for-token against the same weights run offline; bad inputs get
their gRPC status code with the very message REST answers the same JSON with (requests are
filled from that JSON with ``json_format.ParseDict``, as a client moving from REST would);
a deadline or a cancel aborts the request in the engine and frees its blocks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from cluster.grpc import kvferry_pb2 as pb
from cluster.grpc.kvferry_pb2_grpc import InferenceStub
from cluster.grpc.options import SERVICE_NAME
from tests.cluster.conftest import deploy_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kvferry-grpc"
KEY_A, KEY_B = "sk-grpc-alpha-0c3e", "sk-grpc-bravo-9d1a"
SYSTEM = "You answer over gRPC, in protobuf, with care and speed. " * 3  # ~170 tokens


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama slow enough per token (and with room for 1800 of them) that a request
    cut by a 1 s deadline is still far from done."""
    from tests.engine.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("grpc-model"), hidden_size=256,
                           intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    keys = tmp_path_factory.mktemp("grpc-keys") / "api_keys"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    settings = {
        "mode": "colocated",
        "mixed": {"num_replicas": 1},
        "model": {"model": str(tiny_model)},
        "engine": {"num_kv_blocks": 256, "block_size": 16},
        "auth": {"api_keys_file": str(keys)},
    }
    with deploy_app(APP, settings) as (url, cfg):
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc.port}") as channel:
            yield {"url": url, "channel": channel}


@pytest.fixture(scope="module")
def stub(server) -> InferenceStub:
    return InferenceStub(server["channel"])


def _auth(key: str = KEY_A) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _chat(**fields: Any) -> pb.ChatRequest:
    return json_format.ParseDict({"model": "llama", "temperature": 0, "ignore_eos": True, **fields}, pb.ChatRequest())


def _ref_chat(engine: Any, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    from engine import SamplingParams

    ids = engine.encode_chat(messages)
    out = engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
    return out.text, len(ids)


def test_list_models_and_reflection(stub, server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    models = stub.ListModels(pb.ListModelsRequest(), metadata=_auth(), timeout=30).models
    assert [(m.id, m.max_model_len) for m in models] == [("llama", 2048)]
    reflection = reflection_pb2_grpc.ServerReflectionStub(server["channel"])
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = [s.name for s in next(answers).list_services_response.service]
    assert SERVICE_NAME in services


def test_chat_matches_the_engine_and_a_repeat_is_cached_for_its_tenant_only(stub, reference_engine) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello over grpc"}]
    ref_text, n_prompt = _ref_chat(reference_engine, messages, 8)
    first, call = stub.Chat.with_call(_chat(messages=messages, max_tokens=8), metadata=_auth(), timeout=60)
    assert first.content == ref_text and first.finish_reason == "length"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.cached_tokens) == (n_prompt, 8, 0)
    assert first.id.startswith("chatcmpl-") and first.model == "llama"
    trailers = dict(call.trailing_metadata())
    assert "mixed" in trailers["x-kvferry-decode-replica"]

    again = stub.Chat(_chat(messages=messages, max_tokens=8, prompt_cache_retention="1h"), metadata=_auth(), timeout=60)
    assert again.content == ref_text and again.usage.cached_tokens > 0
    # Another API key is another tenant (the same salt as over HTTP): no hit, same answer.
    theirs = stub.Chat(_chat(messages=messages, max_tokens=8), metadata=_auth(KEY_B), timeout=60)
    assert theirs.content == ref_text and theirs.usage.cached_tokens == 0


def test_streams_match_the_unary_answers(stub, reference_engine) -> None:
    from engine import SamplingParams

    messages = [{"role": "user", "content": "stream me a story about ferries"}]
    chunks = list(stub.ChatStream(_chat(messages=messages, max_tokens=10), metadata=_auth(), timeout=60))
    assert "".join(c.content for c in chunks) == _ref_chat(reference_engine, messages, 10)[0]
    assert [c.finish_reason for c in chunks][-1] == "length" and not any(c.finish_reason for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10 and not any(c.HasField("usage") for c in chunks[:-1])

    prompt = "The river carried blocks of memory from one bank to the other, " * 2
    ref = reference_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    request = json_format.ParseDict({"model": "llama", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                     "ignore_eos": True}, pb.CompletionRequest())
    plain = stub.Complete(request, metadata=_auth(), timeout=60)
    assert plain.text == ref.text and plain.usage.prompt_tokens == ref.num_prompt_tokens
    # The token-id form of the prompt streams the same text.
    by_ids = pb.CompletionRequest(model="llama", prompt_token_ids=ref.prompt_token_ids, max_tokens=8,
                                  temperature=0, ignore_eos=True)
    streamed = list(stub.CompleteStream(by_ids, metadata=_auth(), timeout=60))
    assert "".join(c.text for c in streamed) == ref.text and streamed[-1].usage.completion_tokens == 8


# (rpc, JSON body as a REST client sends it, expected code): the message must be REST's.
BAD = [
    ("Chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, grpc.StatusCode.NOT_FOUND),
    ("Chat", {"model": "llama"}, grpc.StatusCode.INVALID_ARGUMENT),
    ("Chat", {"model": "llama", "messages": [{"role": "robot", "content": "hi"}]}, grpc.StatusCode.INVALID_ARGUMENT),
    ("Chat", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5},
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Chat", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Chat", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "prompt_cache_retention": "forever"},
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Complete", {"model": "llama", "prompt": "x" * 2100}, grpc.StatusCode.INVALID_ARGUMENT),
    ("Complete", {"model": "llama", "prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ("CompleteStream", {"model": "llama", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
     grpc.StatusCode.INVALID_ARGUMENT),
    ("ChatStream", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000},
     grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("rpc", "body", "code"), BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_bad_input_gets_its_status_code_with_rests_message(stub, server, rpc: str, body: dict, code) -> None:
    path = "/v1/chat/completions" if rpc.startswith("Chat") else "/v1/completions"
    rest = httpx.post(server["url"] + path, json=body, headers={"authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert rest.status_code in (400, 404)
    message_type = pb.ChatRequest if rpc.startswith("Chat") else pb.CompletionRequest
    request = json_format.ParseDict(body, message_type())
    with pytest.raises(grpc.RpcError) as err:
        answer = getattr(stub, rpc)(request, metadata=_auth(), timeout=60)
        list(answer) if rpc.endswith("Stream") else None
    assert err.value.code() == code
    assert err.value.details() == rest.json()["error"]["message"]


@pytest.mark.parametrize("metadata", [[], _auth("sk-wrong")], ids=["no key", "wrong key"])
def test_a_call_without_a_valid_key_is_unauthenticated(stub, metadata) -> None:
    request = _chat(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    for call in (lambda: stub.Chat(request, metadata=metadata, timeout=30),
                 lambda: list(stub.ChatStream(request, metadata=metadata, timeout=30))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in err.value.details()


def _wait_freed(mixed: Any, within_s: float) -> tuple[Any, float]:
    t0 = time.monotonic()
    while True:
        stats = mixed.stats.remote().result().engine
        if (stats.num_running == 0 and stats.kv_usage == 0) or time.monotonic() - t0 > within_s:
            return stats, time.monotonic() - t0
        time.sleep(0.1)


def test_a_deadline_or_a_cancel_aborts_the_request_and_frees_its_blocks(stub) -> None:
    from ray import serve

    mixed = serve.get_deployment_handle("mixed", app_name=APP)
    long_ask = _chat(messages=[{"role": "user", "content": "talk for a long time about ferries"}], max_tokens=1800)
    # This request's speed, from its first 24 tokens: how long all 1800 would take.
    t0 = time.monotonic()
    measured = list(stub.ChatStream(_chat(messages=[{"role": "user", "content": "talk"}], max_tokens=24),
                                    metadata=_auth(), timeout=60))
    full_s = (time.monotonic() - t0) * 1800 / 24
    assert measured[-1].usage.completion_tokens == 24

    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(long_ask, metadata=_auth(), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats, freed_s = _wait_freed(mixed, within_s=full_s / 2)
    print(f"[measured] gRPC deadline -> blocks freed {freed_s:.2f}s later (the whole request: ~{full_s:.0f}s)")
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_usage == 0 and stats.num_free_blocks == stats.num_total_blocks

    call = stub.ChatStream(long_ask, metadata=_auth(), timeout=60)
    assert [next(call).content is not None for _ in range(4)] == [True] * 4  # running now
    assert mixed.stats.remote().result().engine.num_running == 1
    call.cancel()
    stats, freed_s = _wait_freed(mixed, within_s=full_s / 2)
    assert stats.num_running == 0 and stats.kv_usage == 0
