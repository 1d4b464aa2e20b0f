"""Anthropic Messages API responses: the message, its usage, the SSE events, and errors.

Shapes as the real API sends them and the ``anthropic`` SDK parses them. A stream is
``message_start`` (the message with empty content and the input usage), ``content_block_start``,
``ping``, one ``content_block_delta`` (``text_delta``) per piece of text, ``content_block_stop``,
``message_delta`` (``stop_reason``, ``stop_sequence`` and the final usage, cumulative) and
``message_stop``; each as ``event: NAME`` plus ``data: JSON``. An error after the headers is
an ``error`` event, after which the stream ends.

Usage follows ``cluster.cache_usage.breakpoint_usage``: ``input_tokens`` is the uncached
rest, so ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens`` is the
prompt's length.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from cluster.cache_usage import BreakpointUsage
from cluster.wire import SERVER_OVERLOADED, ApiError, StreamChunk

# Statuses the Anthropic routes answer with, and the error type of each (Anthropic's words).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "api_error", 504: "timeout_error", 529: "overloaded_error"}


class CacheCreation(BaseModel):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class MessageUsage(BaseModel):
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation: CacheCreation
    output_tokens: int
    service_tier: Literal["standard"] = "standard"

    @classmethod
    def of(cls, cache: BreakpointUsage, output_tokens: int) -> MessageUsage:
        return cls(
            input_tokens=cache.input_tokens,
            cache_creation_input_tokens=cache.cache_creation_input_tokens,
            cache_read_input_tokens=cache.cache_read_input_tokens,
            cache_creation=CacheCreation(ephemeral_5m_input_tokens=cache.cache_creation_5m,
                                         ephemeral_1h_input_tokens=cache.cache_creation_1h),
            output_tokens=output_tokens,
        )


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "model_context_window_exceeded"]


class MessageResponse(BaseModel):
    """A generated message (the whole ``POST /v1/messages`` answer, or a stream's start)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextContent]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessageUsage


class CountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Every error of the Anthropic routes: ``{"type": "error", "error": {"type", "message"}}``."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


def stop_reason(last: StreamChunk, max_tokens: int) -> tuple[StopReason, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` of a finished generation."""
    if last.finish_reason == "length":
        return ("max_tokens" if last.completion_tokens >= max_tokens else "model_context_window_exceeded"), None
    if last.stop_string is not None:
        return "stop_sequence", last.stop_string
    return "end_turn", None


def anthropic_error(err: ApiError) -> tuple[int, dict[str, Any]]:
    """``err`` as Anthropic answers it: (status, body). Overload is 529 ``overloaded_error``."""
    status = 529 if err.code == SERVER_OVERLOADED else err.status_code
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return status, AnthropicError(error=AnthropicErrorDetail(type=kind, message=err.message)).model_dump()


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event: its name, and its data (which names its type again)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def stream_start(message: MessageResponse) -> str:
    """``message_start``, ``content_block_start`` (an empty text block) and a ``ping``."""
    return (sse("message_start", {"type": "message_start", "message": message.model_dump()})
            + sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})
            + sse("ping", {"type": "ping"}))


def text_delta(text: str) -> str:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}})


def stream_end(reason: StopReason, sequence: str | None, usage: MessageUsage) -> str:
    """``content_block_stop``, ``message_delta`` (with the final usage) and ``message_stop``."""
    return (sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                    "usage": usage.model_dump(exclude={"service_tier"})})
            + sse("message_stop", {"type": "message_stop"}))


def stream_error(err: ApiError) -> str:
    return sse("error", anthropic_error(err)[1])
