"""Per-request generation settings (OpenAI-style), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a
# smaller number overflows, and the distribution is argmax to within float precision.
GREEDY_TEMPERATURE = 1e-5
# OpenAI's range for a logit_bias value.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class CacheBreakpoint:
    """A cache breakpoint (Anthropic ``cache_control``): the prompt's first ``num_tokens``
    tokens are cached for ``ttl_s`` seconds, sliding on every hit."""

    num_tokens: int
    ttl_s: float

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"a cache breakpoint needs num_tokens >= 1, got {self.num_tokens!r}")
        if not (math.isfinite(self.ttl_s) and self.ttl_s > 0):
            raise ValueError(f"a cache breakpoint needs a positive ttl_s, got {self.ttl_s!r}")


# More breakpoints than any API surface allows (Anthropic: 4): a bound, not a policy.
MAX_CACHE_BREAKPOINTS = 16


@dataclass
class SamplingParams:
    """How to sample one request's tokens and how long to cache its prompt."""

    # Most tokens to generate (the prompt is not counted).
    max_tokens: int = 16
    # 0 (or anything below GREEDY_TEMPERATURE) means greedy; otherwise logits are divided by it.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens whose probability mass >= top_p.
    top_p: float = 1.0
    # Keep only the top_k most likely tokens; -1 (or 0) disables.
    top_k: int = -1
    # Seed for reproducible sampling; token i is drawn from a generator seeded by (seed, i).
    seed: int | None = None
    # Generation stops before any of these strings; the string is not returned.
    stop: list[str] = field(default_factory=list)
    # Generation stops after any of these token ids (kept in token_ids, not in text).
    stop_token_ids: list[int] = field(default_factory=list)
    # Keep generating past the model's end-of-sequence tokens.
    ignore_eos: bool = False
    # Prompt-cache TTL asked for, seconds; None = the engine's default; clamped to its maximum.
    cache_ttl_s: float | None = None
    # Longer TTLs for prefixes of the prompt (the prefix up to each breakpoint); blocks past
    # the last breakpoint keep cache_ttl_s. A block gets the longest TTL that covers it.
    cache_breakpoints: tuple[CacheBreakpoint, ...] = ()
    # Tenant salt folded into the block hashes: tenants never share cached blocks.
    cache_salt: str | None = None
    # Added to the logits of these token ids before sampling (OpenAI logit_bias, -100..100).
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.cache_ttl_s is not None and self.cache_ttl_s <= 0:
            raise ValueError(f"cache_ttl_s must be positive, got {self.cache_ttl_s}")
        self.cache_breakpoints = tuple(self.cache_breakpoints)
        if len(self.cache_breakpoints) > MAX_CACHE_BREAKPOINTS:
            raise ValueError(f"at most {MAX_CACHE_BREAKPOINTS} cache breakpoints, got {len(self.cache_breakpoints)}")
        if any(not isinstance(bp, CacheBreakpoint) for bp in self.cache_breakpoints):
            raise ValueError("cache_breakpoints must be CacheBreakpoint values")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
