"""Per-request generation settings (OpenAI-style), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request's tokens and how long to cache its prompt."""

    # Most tokens to generate (the prompt is not counted).
    max_tokens: int = 16
    # 0 means greedy (argmax); otherwise logits are divided by it.
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
    # Tenant salt folded into the block hashes: tenants never share cached blocks.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.cache_ttl_s is not None and self.cache_ttl_s <= 0:
            raise ValueError(f"cache_ttl_s must be positive, got {self.cache_ttl_s}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
