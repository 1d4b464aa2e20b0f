"""Anthropic Messages API requests (``POST /v1/messages``, ``/v1/messages/count_tokens``) and
their translation to the surface-neutral :class:`~cluster.inference.InferenceRequest`.

Content is text: ``system`` as a string or text blocks, each message's ``content`` as a
string or text blocks (blocks are joined with a blank line). ``tools`` are accepted and
rendered as text at the top of the system turn (the served models have no tool-call
output, so the definitions are context the model reads; the chat template's own tool
support is not used). The prompt is laid out in Anthropic's cache order: tools, then
system, then messages.

``cache_control: {"type": "ephemeral", "ttl": "5m" | "1h"}`` on a tool, a system block or a
message block makes everything up to the end of that block a cache breakpoint
(:class:`~cluster.inference.CacheMark`) with that TTL (5 minutes when unset, Anthropic's
default); a request-level ``cache_control`` marks the last block of the last message (the
automatic form). At most four breakpoints, as in Anthropic's API.

Unknown fields are ignored (clients send ``metadata``, ``tool_choice``, ``thinking``...);
known ones are validated strictly, so a wrong type is a 400, never a silent coercion.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.inference import CacheMark, ChatTurn, InferenceRequest
from cluster.wire import ApiError

MAX_BREAKPOINTS = 4
TTL_S = {"5m": 300.0, "1h": 3600.0}
BLOCK_SEPARATOR = "\n\n"
TOOLS_HEADER = "You can use the following tools (JSON definitions, one per line):\n"


class _Body(BaseModel):
    """Request base: unknown fields ignored, known fields strict (no coercion, no NaN)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class CacheControl(_Body):
    """``{"type": "ephemeral", "ttl": "5m" | "1h"}``."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None

    def ttl_s(self) -> float:
        return TTL_S[self.ttl or "5m"]


class TextBlock(_Body):
    """A text content block (the only kind these models read)."""

    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class Tool(_Body):
    """A tool definition (rendered into the prompt as JSON)."""

    name: str = Field(..., min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: CacheControl | None = None

    def render(self) -> str:
        fields = {"name": self.name, "description": self.description, "input_schema": self.input_schema}
        return json.dumps({k: v for k, v in fields.items() if v is not None}, sort_keys=True)


class InputMessage(_Body):
    """One conversation turn."""

    role: Literal["user", "assistant"]
    content: str | Annotated[list[TextBlock], Field(min_length=1)]


StopSequence = Annotated[str, Field(min_length=1)]


class CountTokensRequest(_Body):
    """``POST /v1/messages/count_tokens`` body (and the prompt part of a messages request)."""

    model: str
    messages: list[InputMessage] = Field(..., min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    cache_control: CacheControl | None = None

    def to_inference(self, request_id: str, api_key: str | None, **sampling: Any) -> InferenceRequest:
        """The surface-neutral request: tools + system as one system turn, then the messages;
        every ``cache_control`` a breakpoint (at most four)."""
        turns: list[ChatTurn] = []
        marks: list[CacheMark] = []
        system_parts = [(TOOLS_HEADER + t.render(), t.cache_control) for t in self.tools or ()]
        if isinstance(self.system, str):
            system_parts.append((self.system, None))
        elif self.system:
            system_parts += [(b.text, b.cache_control) for b in self.system]
        if system_parts:
            turns.append(_turn("system", system_parts, 0, marks))
        for m in self.messages:
            parts = [(m.content, None)] if isinstance(m.content, str) else [(b.text, b.cache_control) for b in m.content]
            turns.append(_turn(m.role, parts, len(turns), marks))
        if self.cache_control is not None:  # automatic: the end of the last message
            marks.append(CacheMark(len(turns) - 1, len(turns[-1].text), self.cache_control.ttl_s()))
        if len(marks) > MAX_BREAKPOINTS:
            raise ApiError(400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                                f"Found {len(marks)}.")
        return InferenceRequest(request_id, self.model, messages=tuple(turns), prompt_param="messages",
                                cache_marks=tuple(marks), api_key=api_key, surface="anthropic", **sampling)


def _turn(role: str, parts: list[tuple[str, CacheControl | None]], index: int, marks: list[CacheMark]) -> ChatTurn:
    """One chat turn of ``parts`` joined by blank lines; a marked part adds a CacheMark at its end."""
    text = ""
    for i, (part, cache_control) in enumerate(parts):
        text += (BLOCK_SEPARATOR if i else "") + part
        if cache_control is not None:
            marks.append(CacheMark(index, len(text), cache_control.ttl_s()))
    return ChatTurn(role, text)


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages`` body."""

    max_tokens: int = Field(..., ge=1, description="Tokens to generate (required, as in Anthropic's API).")
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[StopSequence] | None = Field(None, max_length=16)
    stream: bool = False

    def to_generate(self, request_id: str, api_key: str | None) -> InferenceRequest:
        """The surface-neutral request with this body's sampling fields (Anthropic's defaults
        for those not sent: temperature 1, no nucleus or top-k cut)."""
        return self.to_inference(
            request_id, api_key, max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if not self.top_k else self.top_k,
            stop=tuple(self.stop_sequences or ()),
        )
