"""The surface-neutral request every API adapter builds (OpenAI, Anthropic, Gemini, gRPC).

Plain frozen dataclasses, no Ray and no HTTP: an adapter fills one from its own request
shape and hands it to :class:`cluster.front_door.FrontDoor`, which does the rest once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTurn:
    """One chat message as plain text (surfaces join their content blocks)."""

    role: str
    text: str


@dataclass(frozen=True)
class CacheMark:
    """A cache breakpoint in a surface's own units: the conversation up to the first
    ``chars`` characters of message ``message``'s text is cached for ``ttl_s`` seconds
    (sliding). :meth:`FrontDoor.prepare` turns it into a token count."""

    message: int
    chars: int
    ttl_s: float


@dataclass(frozen=True)
class CachePin:
    """An explicit cache: pin the prompt's first ``num_tokens`` (None: all) under ``cache_id``
    on the replica that serves it, until ``expires_at`` (wall clock; ``engine.pins``)."""

    cache_id: str
    expires_at: float
    num_tokens: int | None = None


@dataclass(frozen=True)
class InferenceRequest:
    """What every surface asks of the model, in one surface-neutral shape."""

    request_id: str
    model: str
    # A chat (rendered with the model's template) or a completion prompt (text or token ids).
    messages: tuple[ChatTurn, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    # The name of the field that carried the prompt, for error messages ("messages", ...).
    prompt_param: str = "messages"
    # None: as many as fit, up to the configured default.
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Whole-prompt cache TTL (OpenAI prompt_cache_retention); None: the engine default.
    cache_ttl_s: float | None = None
    # Per-prefix TTLs (Anthropic cache_control), for chats only.
    cache_marks: tuple[CacheMark, ...] = ()
    # OpenAI prompt_cache_key: requests sharing it share a prefix.
    prompt_cache_key: str | None = None
    # The caller's API key (the tenant); never leaves the ingress.
    api_key: str | None = None
    # Which API the request came in through (metrics label): openai, anthropic, gemini, grpc.
    surface: str = "openai"
    # False: render the chat without the assistant's opening (an explicit cache's contents).
    add_generation_prompt: bool = True
    # Explicit caches: pin the prompt's prefix; prefer the replica that already pins it.
    pin: CachePin | None = None
    prefer_replica: str | None = None
