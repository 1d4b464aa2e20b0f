"""OpenAI-compatible request and response models (the HTTP edge) and their engine mapping.

Requests accept the fields OpenAI clients send; unknown fields are ignored (clients send
many optional knobs) but known fields are validated strictly: a wrong type or an
out-of-range value is a 400 ``invalid_request_error``, never a 500.

Prompt-cache controls: ``prompt_cache_key`` (OpenAI: a hint that groups requests sharing a
prefix; forwarded as the routing key) and ``prompt_cache_retention`` (``"in_memory"`` for
the default sliding TTL, or a duration like ``"24h"``, ``"1h"``, ``"30m"``, ``"90s"``; the
engine clamps it to its maximum TTL). Anthropic-style ``cache_control: {"type":
"ephemeral", "ttl": "1h"}`` on message content parts is honoured the same way.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.inference import CacheMark, ChatTurn, InferenceRequest
from engine.outputs import TokensByTier

# A positive duration ("24h", "1h", "5m", "90s", "0.5d"; zero is not one) or a keyword for
# the default TTL. The schema carries this pattern, so what it accepts the server accepts.
_KEYWORDS = ("in_memory", "in-memory", "default", "ephemeral")
_POSITIVE = r"(?:0*[1-9][0-9]*(?:\.[0-9]+)?|0+\.[0-9]*[1-9][0-9]*)"
RETENTION_PATTERN = rf"^(?:{'|'.join(_KEYWORDS)}|{_POSITIVE}[smhd])$"
_DURATION = re.compile(rf"^({_POSITIVE})([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Retention = Annotated[str, Field(pattern=RETENTION_PATTERN, description='"in_memory" or a duration: "5m", "1h", "24h".')]
TokenId = Annotated[int, Field(strict=True, ge=0)]
StopString = Annotated[str, Field(min_length=1)]


def parse_retention(value: str | None) -> float | None:
    """Map ``prompt_cache_retention`` to a TTL in seconds (None = the engine's default).

    >>> parse_retention("in_memory") is None, parse_retention("24h"), parse_retention("5m")
    (True, 86400.0, 300.0)
    """
    if value is None or value in _KEYWORDS:
        return None
    m = _DURATION.match(value)
    if not m:
        raise ValueError(
            f"prompt_cache_retention must be 'in_memory' or a duration like '24h', '1h', '5m', got {value!r}"
        )
    return float(m.group(1)) * _UNIT_S[m.group(2)]


class _Edge(BaseModel):
    """Request base: ignore unknown fields (clients send many), validate known ones strictly.

    Strict: ``"max_tokens": "2"`` or ``"stream": "true"`` is a 400 like in OpenAI's API, not
    silently coerced; the OpenAPI schema says ``integer`` and ``boolean``, and the server
    now means it (an integer is still a valid float). A float that overflows to infinity
    (``1e400``) is refused as "not a finite number" rather than compared with a bound.
    """

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class CacheControl(_Edge):
    """Anthropic-style cache marker on a content part."""

    type: Literal["ephemeral"] = "ephemeral"
    ttl: Retention | None = None


class ContentPart(_Edge):
    """One part of a message's content (only text is served by these models)."""

    type: Literal["text"] = "text"
    text: str
    cache_control: CacheControl | None = None


class ChatMessage(_Edge):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (content parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def cache_marks(self, index: int, default_ttl_s: float) -> list[CacheMark]:
        """This message's Anthropic-style ``cache_control`` parts as breakpoints: the
        conversation up to the end of each marked part is cached for its TTL."""
        if not isinstance(self.content, list):
            return []
        marks, chars = [], 0
        for part in self.content:
            chars += len(part.text)
            if part.cache_control is not None:
                ttl = parse_retention(part.cache_control.ttl) or default_ttl_s
                marks.append(CacheMark(index, chars, ttl))
        return marks


class StreamOptions(_Edge):
    """OpenAI ``stream_options``."""

    include_usage: bool = False


class _SamplingFields(_Edge):
    """Sampling and cache fields common to chat and completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate (>= 1).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="Up to 4 non-empty strings; generation stops before any of them."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is served.")
    user: str | None = None
    ignore_eos: bool = False
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: Retention | None = None
    logit_bias: (
        dict[
            Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
            Annotated[float, Field(ge=-100.0, le=100.0)],
        ]
        | None
    ) = Field(None, max_length=1024, description="Token id (as a string) -> bias added to its logit, -100..100.")

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # kvferry extension: an explicit cache ("cachedContents/{id}") whose contents prefix the messages.
    cached_content: str | None = Field(None, max_length=256, description='An explicit cache, "cachedContents/{id}".')

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def retention(self) -> str | None:
        return self.prompt_cache_retention

    def to_inference(self, request_id: str, api_key: str | None, default_ttl_s: float) -> InferenceRequest:
        """The surface-neutral request (cache_control parts become breakpoints)."""
        marks = [mark for i, m in enumerate(self.messages) for mark in m.cache_marks(i, default_ttl_s)]
        turns = tuple(ChatTurn(m.role, m.text()) for m in self.messages)
        return InferenceRequest(request_id, self.model, messages=turns, prompt_param="messages",
                                cache_marks=tuple(marks), api_key=api_key, **_sampling(self))


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body (one prompt: a string or a list of token ids)."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] = Field(
        ..., description="A non-empty text, or a non-empty list of token ids."
    )
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def retention(self) -> str | None:
        return self.prompt_cache_retention

    def to_inference(self, request_id: str, api_key: str | None) -> InferenceRequest:
        """The surface-neutral request."""
        prompt = self.prompt if isinstance(self.prompt, str) else tuple(self.prompt)
        return InferenceRequest(request_id, self.model, prompt=prompt, prompt_param="prompt",
                                api_key=api_key, **_sampling(self))


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CachedTokensByTier(BaseModel):
    """Where the cached prompt tokens were found; the three add up to ``cached_tokens``."""

    device: int = Field(0, description="Tokens whose KV was already in accelerator (or CPU engine) memory.")
    host: int = Field(0, description="Tokens whose KV came back from the host-memory tier.")
    disk: int = Field(0, description="Tokens whose KV came back from the local-disk tier.")


class KvferryUsage(BaseModel):
    """kvferry's extension of ``usage`` (clients that do not know it ignore it)."""

    cached_tokens_by_tier: CachedTokensByTier = Field(default_factory=CachedTokensByTier)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Always present (0 too): clients read it to measure their cache hit rate.
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # DeepSeek's names for the same split: hit + miss = prompt_tokens.
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    kvferry: KvferryUsage = Field(default_factory=KvferryUsage, description="kvferry's extension: the KV tiers.")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
           by_tier: TokensByTier | None = None) -> Usage:
        """``by_tier``: the engine's split of ``cached_tokens`` (None: all from the device)."""
        split = by_tier if by_tier is not None else TokensByTier(device=cached_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            prompt_cache_hit_tokens=cached_tokens,
            prompt_cache_miss_tokens=prompt_tokens - cached_tokens,
            kvferry=KvferryUsage(cached_tokens_by_tier=CachedTokensByTier(
                device=split.device, host=split.host, disk=split.disk)),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvferry"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_request_id(prefix: str = "req") -> str:
    """A fresh request id (also the ``x-request-id`` header)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def full_response(chat: bool, rid: str, model: str, text: str, finish_reason: str | None, usage: Usage) -> BaseModel:
    """The non-streamed body of a chat or text completion."""
    if chat:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(id=rid, model=model, usage=usage, choices=[choice])
    return CompletionResponse(id=rid, model=model, usage=usage,
                              choices=[CompletionChoice(text=text, finish_reason=finish_reason)])


def stream_event(chat: bool, rid: str, model: str, text: str, finish_reason: str | None, first: bool) -> str:
    """One SSE ``data:`` line carrying a text delta (the first chat delta names the role)."""
    if chat:
        delta = DeltaMessage(content=text, role="assistant" if first else None)
        event: BaseModel = ChatCompletionChunk(
            id=rid, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)])
        return f"data: {event.model_dump_json(exclude_none=True)}\n\n"
    event = CompletionResponse(id=rid, model=model, choices=[CompletionChoice(text=text, finish_reason=finish_reason)])
    return f"data: {event.model_dump_json()}\n\n"


def usage_event(chat: bool, rid: str, model: str, usage: Usage) -> str:
    """The SSE event with ``usage`` and no choices (``stream_options.include_usage``)."""
    event: BaseModel
    if chat:
        event = ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage)
    else:
        event = CompletionResponse(id=rid, model=model, choices=[], usage=usage)
    return f"data: {event.model_dump_json()}\n\n"


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling and cache fields of an OpenAI request, as InferenceRequest fields."""
    return {
        "max_tokens": req.requested_max_tokens(),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop": tuple(req.stop_list()),
        "ignore_eos": req.ignore_eos,
        "cache_ttl_s": parse_retention(req.retention()),
        "logit_bias": {int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        "prompt_cache_key": req.prompt_cache_key,
    }
