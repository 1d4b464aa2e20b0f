"""kvferry.v1 messages <-> the shared request path: requests in, answers and status codes out.

A proto request becomes the *OpenAI* request model (``cluster.protocol``) first, then the
surface-neutral :class:`~cluster.inference.InferenceRequest`: the proto's fields carry the
JSON's names, and only the fields a client set go in (proto3 ``optional`` presence, a
non-empty repeated field, a non-default scalar), so validation, defaults and every error
message are exactly REST's. Plain functions, no Ray and no server: unit-testable.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf.message import Message
from pydantic import ValidationError

from cluster.grpc import kvferry_pb2 as pb
from cluster.http_errors import validation_error
from cluster.inference import InferenceRequest
from cluster.protocol import ChatCompletionRequest, CompletionRequest
from cluster.wire import ApiError, StreamChunk

# ApiError's HTTP status -> the gRPC code a client sees (anything else: INTERNAL).
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(err: ApiError) -> grpc.StatusCode:
    """The gRPC status code of an API error."""
    return STATUS_CODES.get(err.status_code, grpc.StatusCode.INTERNAL)


def present_fields(msg: Message) -> dict[str, Any]:
    """The fields a client set, as the JSON object it would have sent over REST.

    ``ListFields`` yields exactly the present ones: ``optional`` scalars that were set
    (zero included), non-empty repeated and map fields, other scalars that differ from
    their zero value (proto3 cannot tell an empty string from an absent one).
    """
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif field.message_type is not None and field.is_repeated:
            out[field.name] = [present_fields(m) for m in value]
        elif field.message_type is not None:
            out[field.name] = present_fields(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _validated(model: type[ChatCompletionRequest] | type[CompletionRequest], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(), data) from None


def chat_request(msg: pb.ChatRequest, request_id: str, api_key: str | None, default_ttl_s: float) -> InferenceRequest:
    """A ``ChatRequest`` as the shared request (validated as a REST chat completion)."""
    body: ChatCompletionRequest = _validated(ChatCompletionRequest, present_fields(msg))
    return body.to_inference(request_id, api_key, default_ttl_s)


def completion_request(msg: pb.CompletionRequest, request_id: str, api_key: str | None) -> InferenceRequest:
    """A ``CompletionRequest`` as the shared request; the token-id form fills REST's ``prompt``."""
    data = present_fields(msg)
    ids = data.pop("prompt_token_ids", None)
    if ids is not None:
        if "prompt" in data:
            raise ApiError(400, "prompt: set prompt or prompt_token_ids, not both", param="prompt")
        data["prompt"] = ids
    body: CompletionRequest = _validated(CompletionRequest, data)
    return body.to_inference(request_id, api_key)


def usage(last: StreamChunk) -> pb.Usage:
    """The usage of a finished generation."""
    return pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                    total_tokens=last.prompt_tokens + last.completion_tokens, cached_tokens=last.cached_tokens)


def full_response(chat: bool, rid: str, model: str, text: str, last: StreamChunk) -> pb.ChatResponse | pb.CompletionResponse:
    """The unary answer of ``Chat`` or ``Complete``."""
    common = {"id": rid, "model": model, "created": int(time.time()),
              "finish_reason": last.finish_reason or "", "usage": usage(last)}
    return pb.ChatResponse(content=text, **common) if chat else pb.CompletionResponse(text=text, **common)


def chunk(chat: bool, rid: str, model: str, item: StreamChunk) -> pb.ChatChunk | pb.CompletionChunk:
    """One streamed message; the finished one carries the finish reason and usage."""
    common: dict[str, Any] = {"id": rid, "model": model, "created": int(time.time())}
    if item.finished:
        common.update(finish_reason=item.finish_reason or "", usage=usage(item))
    return pb.ChatChunk(content=item.new_text, **common) if chat else pb.CompletionChunk(text=item.new_text, **common)
