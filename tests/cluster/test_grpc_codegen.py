"""The checked-in generated gRPC modules are what protoc makes of the proto today, and the
translation between kvferry.v1 messages and the shared request path (no Ray, no server)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cluster.grpc import codegen
from cluster.grpc import kvferry_pb2 as pb
from cluster.grpc import translate
from cluster.grpc.options import SERVICER_FUNCTION, grpc_options
from cluster.wire import ApiError, StreamChunk


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    for fresh in codegen.generate(tmp_path):
        committed = codegen.ROOT / codegen.PROTO.parent / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(codegen.ROOT)} is stale: run python -m cluster.grpc.codegen")


def test_the_servicer_function_registers_every_rpc_of_the_service() -> None:
    import importlib

    module, _, name = SERVICER_FUNCTION.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["Inference"].methods}
    assert rpcs == {"ListModels", "Complete", "CompleteStream", "Chat", "ChatStream"}
    assert grpc_options(0) is None and grpc_options(9000)["enable_reflection"] is True


def test_only_the_fields_a_client_set_reach_validation() -> None:
    msg = pb.ChatRequest(model="m", messages=[pb.ChatMessage(role="user", content="hi")], temperature=0.0,
                         seed=0, stop=["x"], logit_bias={"7": -1.5})
    assert translate.present_fields(msg) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "seed": 0,
        "stop": ["x"], "logit_bias": {"7": -1.5}}
    req = translate.chat_request(pb.ChatRequest(model="m", messages=[pb.ChatMessage(role="user", content="hi")]),
                                 "r1", "key", default_ttl_s=300.0)
    # Absent optional fields take REST's defaults, not proto3's zeros.
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens, req.seed) == (1.0, 1.0, -1, None, None)
    assert req.api_key == "key" and req.messages[0].text == "hi"


def test_prompt_token_ids_fill_rests_prompt_and_both_forms_are_refused() -> None:
    req = translate.completion_request(pb.CompletionRequest(model="m", prompt_token_ids=[3, 4]), "r", None)
    assert req.prompt == (3, 4) and req.prompt_param == "prompt"
    with pytest.raises(ApiError) as err:
        translate.completion_request(pb.CompletionRequest(model="m", prompt="a", prompt_token_ids=[3]), "r", None)
    assert err.value.status_code == 400 and err.value.param == "prompt"


@pytest.mark.parametrize(("status", "code"), [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED), (404, grpc.StatusCode.NOT_FOUND),
    (429, grpc.StatusCode.RESOURCE_EXHAUSTED), (503, grpc.StatusCode.UNAVAILABLE),
    (504, grpc.StatusCode.DEADLINE_EXCEEDED), (500, grpc.StatusCode.INTERNAL), (418, grpc.StatusCode.INTERNAL)])
def test_api_error_statuses_map_to_grpc_codes(status: int, code: grpc.StatusCode) -> None:
    assert translate.status_code(ApiError(status, "m")) == code


def test_only_the_last_chunk_carries_usage() -> None:
    mid = StreamChunk("a", (1,), False, None, 5, 1, 2, "local", "d")
    last = StreamChunk("b", (2,), True, "stop", 5, 2, 2, "local", "d")
    assert not translate.chunk(True, "id", "m", mid).HasField("usage")
    done = translate.chunk(False, "id", "m", last)
    assert (done.text, done.finish_reason, done.usage.total_tokens, done.usage.cached_tokens) == ("b", "stop", 7, 2)
