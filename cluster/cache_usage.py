"""Prompt-cache accounting of one finished request: tokens read and written, per TTL class.

Pure arithmetic on what the engine reports (the prompt's length, how many leading tokens
it served from the cache) and what the request asked for (its whole-prompt TTL, its cache
breakpoints). The engine caches whole blocks only: a prompt's first ``cached_tokens`` (a
multiple of the block size) were read from the cache, and each later *full* block of the
prompt was written. A block's TTL is the longest of the request's whole-prompt TTL and of
every breakpoint that covers the whole block (``engine.request.Request.block_ttl_s``).

Two views of the same numbers:

* :func:`cache_account` is what the engine did, for the metrics of every surface: tokens
  read (their TTL refreshed) and tokens written, each under its block's TTL class.
* :func:`breakpoint_usage` is Anthropic's ``usage``: ``cache_read_input_tokens`` is every
  token read from the cache; ``cache_creation_input_tokens`` counts the tokens up to the
  last breakpoint, in full blocks, that were not read, each under the longest TTL of the
  breakpoints covering its block; ``input_tokens`` is the rest. The three add up to the
  prompt. Blocks past the last breakpoint are cached too (kvferry caches every prompt, as
  OpenAI does) but are not a cache write a client asked for, so they count as input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine import CacheBreakpoint

# Metric labels: the two TTLs Anthropic's cache_control offers, and everything else.
TTL_CLASSES = ("5m", "1h", "other")
_CLASS_BY_TTL_S = {300.0: "5m", 3600.0: "1h"}


def ttl_class(ttl_s: float) -> str:
    """``"5m"``, ``"1h"`` or ``"other"``: a bounded label for a TTL in seconds."""
    return _CLASS_BY_TTL_S.get(round(float(ttl_s)), "other")


@dataclass(frozen=True)
class CacheAccount:
    """Prompt tokens read from and written to the cache by one request, per TTL class."""

    read: dict[str, int]
    written: dict[str, int]


@dataclass(frozen=True)
class BreakpointUsage:
    """Anthropic's cache usage of one request (see the module docstring)."""

    input_tokens: int
    cache_read_input_tokens: int
    cache_creation_5m: int
    cache_creation_1h: int

    @property
    def cache_creation_input_tokens(self) -> int:
        return self.cache_creation_5m + self.cache_creation_1h


def _covering_ttl(end: int, breakpoints: Sequence[CacheBreakpoint], floor_s: float) -> float:
    """The longest TTL of ``floor_s`` and every breakpoint reaching token ``end``."""
    return max([floor_s] + [bp.ttl_s for bp in breakpoints if bp.num_tokens >= end])


def cache_account(
    prompt_tokens: int, cached_tokens: int, block_size: int, default_ttl_s: float,
    breakpoints: Sequence[CacheBreakpoint] = (),
) -> CacheAccount:
    """What the engine read and wrote for a prompt of ``prompt_tokens`` whose first
    ``cached_tokens`` came from the cache; ``default_ttl_s`` is its whole-prompt TTL."""
    read = dict.fromkeys(TTL_CLASSES, 0)
    written = dict.fromkeys(TTL_CLASSES, 0)
    for start in range(0, prompt_tokens - block_size + 1, block_size):
        cls = ttl_class(_covering_ttl(start + block_size, breakpoints, default_ttl_s))
        (read if start < cached_tokens else written)[cls] += block_size
    return CacheAccount(read, written)


def breakpoint_usage(
    prompt_tokens: int, cached_tokens: int, block_size: int, breakpoints: Sequence[CacheBreakpoint],
) -> BreakpointUsage:
    """Anthropic's usage numbers for a prompt with cache ``breakpoints`` (already in tokens,
    those under the minimum cacheable length already dropped)."""
    last = max((bp.num_tokens for bp in breakpoints), default=0)
    span = min(last, prompt_tokens) // block_size * block_size
    by_class = {"5m": 0, "1h": 0}
    for start in range(cached_tokens, span, block_size):
        ttl = _covering_ttl(start + block_size, breakpoints, 0.0)
        by_class["5m" if ttl <= 300.0 else "1h"] += block_size
    created = by_class["5m"] + by_class["1h"]
    return BreakpointUsage(
        input_tokens=prompt_tokens - cached_tokens - created,
        cache_read_input_tokens=cached_tokens,
        cache_creation_5m=by_class["5m"],
        cache_creation_1h=by_class["1h"],
    )
