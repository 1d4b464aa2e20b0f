"""The Anthropic Messages API as a thin adapter over the :class:`~cluster.front_door.FrontDoor`.

``create`` turns a :class:`~cluster.anthropic_protocol.MessagesRequest` into an
``InferenceRequest``, opens it through the FrontDoor (which checks the model, tokenizes
with the chat template, turns cache_control marks into token-count breakpoints, salts the
cache with the tenant's key and routes it) and renders the chunks as one message or as
Anthropic's SSE events. ``count_tokens`` asks the FrontDoor for the prompt's length, so it
equals the prompt a generate call reports (``input_tokens`` plus both cache counts). The
``anthropic-version`` and ``anthropic-beta`` headers are accepted whatever they say.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.anthropic_protocol import CountTokensRequest, MessagesRequest
from cluster.anthropic_responses import (
    AnthropicError,
    CountTokensResponse,
    MessageResponse,
    MessageUsage,
    TextContent,
    stop_reason,
    stream_end,
    stream_error,
    stream_start,
    text_delta,
)
from cluster.cache_usage import breakpoint_usage
from cluster.front_door import FrontDoor, Generation
from cluster.http_metrics import set_error_code
from cluster.tenancy import api_key_from_headers
from cluster.wire import INTERNAL_ERROR, ApiError, StreamChunk

logger = logging.getLogger(__name__)

_EVENT_TYPES = ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop", "error"]
# The OpenAPI description of the routes' answers: Anthropic's error shape, and SSE events.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": AnthropicError, "description": text} for status, text in (
        (400, "invalid_request_error: malformed JSON, a wrong field, too many cache breakpoints, a long prompt."),
        (401, "authentication_error: the server has API keys and the x-api-key sent is missing or wrong."),
        (404, "not_found_error: the model does not exist on this server."),
        (413, "request_too_large: the body is over the server's size limit."),
        (500, "api_error: this request failed inside the server (others are unaffected)."),
        (503, "api_error: no replica can take the request now; retry after `Retry-After` seconds."),
        (504, "timeout_error: the request timed out."),
        (529, "overloaded_error: every replica is busy and the queue is full; retry after `Retry-After` seconds."),
    )
}
MESSAGES_RESPONSES: dict[int | str, dict[str, Any]] = {**ERROR_RESPONSES, 200: {
    "description": "The message as JSON, or Anthropic's server-sent events when `stream` is true.",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"], "description": "One server-sent event.",
        "properties": {"event": {"enum": _EVENT_TYPES}, "data": {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": {"type": "object", "required": ["type"], "properties": {"type": {"enum": _EVENT_TYPES}}},
        }},
    }}},
}}


def _api_key(request: Request) -> str | None:
    return api_key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))


class AnthropicMessages:
    """``/v1/messages`` and ``/v1/messages/count_tokens`` over one FrontDoor."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    async def count_tokens(self, body: CountTokensRequest, request: Request) -> CountTokensResponse:
        req = body.to_inference(request.state.request_id, _api_key(request))
        return CountTokensResponse(input_tokens=await self.door.count_tokens(req))

    async def create(self, body: MessagesRequest, request: Request) -> Any:
        gen = await self.door.open(body.to_generate(request.state.request_id, _api_key(request)))
        msg_id = "msg_" + request.state.request_id
        block_size = (await self.door.model_info()).block_size

        def usage(chunk: StreamChunk) -> MessageUsage:
            cache = breakpoint_usage(chunk.prompt_tokens, chunk.cached_tokens, block_size, gen.breakpoints)
            return MessageUsage.of(cache, chunk.completion_tokens)

        if body.stream:
            start = MessageResponse(id=msg_id, model=self.door.model_name, content=[], usage=usage(gen.first))
            events = self._events(gen, start, body.max_tokens, usage, request.state)
            return StreamingResponse(events, media_type="text/event-stream", headers=gen.headers())
        text, last = await gen.collect()
        reason, sequence = stop_reason(last, body.max_tokens)
        message = MessageResponse(id=msg_id, model=self.door.model_name, content=[TextContent(text=text)],
                                  stop_reason=reason, stop_sequence=sequence, usage=usage(last))
        return JSONResponse(message.model_dump(), headers=gen.headers())

    async def _events(
        self, gen: Generation, start: MessageResponse, max_tokens: int, usage: Any, state: Any
    ) -> AsyncIterator[str]:
        """The event stream; a failure after the headers is an ``error`` event, never a trace."""
        yield stream_start(start)
        try:
            async for item in gen.chunks():
                if item.new_text:
                    yield text_delta(item.new_text)
                if item.finished:
                    reason, sequence = stop_reason(item, max_tokens)
                    yield stream_end(reason, sequence, usage(item))
        except ApiError as e:  # the replica failed mid-stream: say so, then stop
            set_error_code(state, e.code or e.type)
            yield stream_error(e)
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            logger.warning("stream %s broke: %r", start.id, e)
            set_error_code(state, "stream_interrupted")
            yield stream_error(ApiError(500, "stream interrupted", code=INTERNAL_ERROR))
        finally:
            gen.cancel()
