"""Gemini API request and response models (``/v1beta/``), and Google's error shape.

The shapes the google-genai SDK sends and parses (camelCase JSON): ``Content`` (a role,
``user`` or ``model``, and text ``parts``), ``CachedContent`` (explicit caches),
``GenerateContentRequest`` / ``GenerateContentResponse`` with ``usageMetadata``. Unknown
fields are ignored (clients send many); known fields are validated strictly, and only
text parts are served (any other part is a clear 400). Durations are Google's JSON form
(``"600s"``, ``"1.5s"``), times RFC 3339 (``"2026-01-01T00:00:00Z"``).

Errors: ``{"error": {"code": 404, "message": ..., "status": "NOT_FOUND"}}``
(:func:`google_error_body`, registered for ``/v1beta/`` in ``cluster.error_shapes``).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from cluster.inference import ChatTurn
from cluster.wire import ApiError

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def google_error_body(err: ApiError) -> dict[str, Any]:
    """Google's error envelope for an :class:`ApiError`."""
    status = _STATUS_NAMES.get(err.status_code, "INVALID_ARGUMENT" if err.status_code < 500 else "INTERNAL")
    return {"error": {"code": err.status_code, "message": err.message, "status": status}}


class GoogleErrorDetail(BaseModel):
    code: int
    message: str
    status: str


class GoogleErrorResponse(BaseModel):
    """Every non-2xx answer on ``/v1beta/``: ``{"error": {"code", "message", "status"}}``."""

    error: GoogleErrorDetail


def _doc(description: str) -> dict[str, Any]:
    return {"model": GoogleErrorResponse, "description": description}


# The error statuses the Gemini routes answer with, for the OpenAPI schema.
GOOGLE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _doc("INVALID_ARGUMENT: malformed JSON, a wrong type or value, a bad ttl, a prompt over the context."),
    401: _doc("UNAUTHENTICATED: the server has API keys and none, or a wrong one, was sent."),
    404: _doc("NOT_FOUND: the model, or a cached content this API key owns, does not exist."),
    413: _doc("INVALID_ARGUMENT: the request body is over the server's size limit."),
    429: _doc("RESOURCE_EXHAUSTED: this API key's explicit-cache budget, or the server's pinned capacity, is full."),
    500: _doc("INTERNAL: this request failed inside the server (others are unaffected)."),
    503: _doc("UNAVAILABLE: overloaded, or no replica can take the request now."),
    504: _doc("DEADLINE_EXCEEDED: the request timed out."),
}


_DURATION = re.compile(r"^([0-9]{1,12})(?:\.([0-9]{1,9}))?s$")


def parse_duration(value: str, param: str = "ttl") -> float:
    """Google's JSON duration (``"600s"``, ``"0.5s"``) in seconds; ApiError 400 otherwise."""
    m = _DURATION.match(value)
    if not m:
        raise ApiError(400, f"{param} must be a duration in seconds like \"600s\", got {value!r}", param=param)
    return float(f"{m.group(1)}.{m.group(2) or 0}")


def parse_time(value: str, param: str = "expireTime") -> float:
    """An RFC 3339 timestamp as epoch seconds; ApiError 400 otherwise."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ApiError(400, f"{param} must be an RFC 3339 time with a zone, like \"2026-01-01T00:00:00Z\", "
                       f"got {value!r}", param=param)
    return when.timestamp()


def format_time(epoch_s: float) -> str:
    """Epoch seconds as RFC 3339 UTC with microseconds (``...T12:00:00.123456Z``)."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Camel(BaseModel):
    """camelCase on the wire; unknown fields ignored, known ones strict."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", strict=True)


class Part(_Camel):
    text: str | None = None


class Content(_Camel):
    role: str | None = None
    parts: list[Part] = Field(default_factory=list)

    def text(self, param: str) -> str:
        """The parts' text joined (Gemini concatenates text parts); only text parts are served."""
        if any(p.text is None for p in self.parts):
            raise ApiError(400, f"{param}: only text parts are supported", param=param)
        return "".join(p.text or "" for p in self.parts)


def to_turns(contents: list[Content], system: Content | None, param: str = "contents") -> tuple[ChatTurn, ...]:
    """Gemini contents (and system instruction) as chat turns: ``model`` is the assistant."""
    turns = [ChatTurn("system", system.text("systemInstruction"))] if system is not None else []
    for i, c in enumerate(contents):
        role = c.role or "user"
        if role not in ("user", "model"):
            raise ApiError(400, f"{param}.{i}.role must be 'user' or 'model', got {role!r}", param=f"{param}.{i}.role")
        turns.append(ChatTurn("assistant" if role == "model" else "user", c.text(f"{param}.{i}.parts")))
    return tuple(turns)


# --------------------------------------------------------------------------- explicit caches


class CreateCachedContent(_Camel):
    """``POST /v1beta/cachedContents`` body."""

    model: str = Field(..., min_length=1, description='"models/{name}".')
    contents: list[Content] = Field(default_factory=list)
    system_instruction: Content | None = None
    ttl: str | None = None
    expire_time: str | None = None
    display_name: str = Field("", max_length=128)


class UpdateCachedContent(_Camel):
    """``PATCH /v1beta/cachedContents/{id}`` body: only the expiry may change."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow", strict=True)
    ttl: str | None = None
    expire_time: str | None = None


class CacheUsage(_Camel):
    total_token_count: int


class CachedContent(_Camel):
    """An explicit cache as the API shows it (never its contents, like Gemini)."""

    name: str
    model: str
    display_name: str = ""
    create_time: str
    update_time: str
    expire_time: str
    usage_metadata: CacheUsage


class ListCachedContents(_Camel):
    cached_contents: list[CachedContent] = Field(default_factory=list)
    next_page_token: str | None = None


# --------------------------------------------------------------------------- generateContent


class GenerationConfig(_Camel):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # The SDK types topK as a number: 40.0 is accepted as 40.
    top_k: float | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=5)] | None = None
    seed: int | None = None
    candidate_count: int | None = Field(None, ge=1, le=1, description="Only one candidate is served.")


class GenerateContentRequest(_Camel):
    """``POST /v1beta/models/{model}:generateContent`` (and ``:streamGenerateContent``) body."""

    contents: list[Content] = Field(..., min_length=1)
    system_instruction: Content | None = None
    generation_config: GenerationConfig | None = None
    cached_content: str | None = Field(None, description='"cachedContents/{id}".')


class UsageMetadata(_Camel):
    prompt_token_count: int
    candidates_token_count: int
    total_token_count: int
    cached_content_token_count: int = 0


class Candidate(_Camel):
    content: Content
    finish_reason: str | None = None
    index: int = 0


class GenerateContentResponse(_Camel):
    candidates: list[Candidate]
    usage_metadata: UsageMetadata
    model_version: str
    response_id: str


FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS"}


def response(text: str, finish: str | None, usage: UsageMetadata, model: str, rid: str) -> GenerateContentResponse:
    """One (whole or streamed) response; ``finish`` is the engine's reason, None mid-stream."""
    reason = None if finish is None else FINISH_REASONS.get(finish, "OTHER")
    content = Content(role="model", parts=[Part(text=text)])
    return GenerateContentResponse(candidates=[Candidate(content=content, finish_reason=reason)],
                                   usage_metadata=usage, model_version=model, response_id=rid)
