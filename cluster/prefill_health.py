"""Is the prefill pool worth waiting for? A circuit breaker with probes, on an explicit clock.

A decode replica must never make a request wait for a prefill pool that is down: a dead
or unreachable pool may cost a request no more than prefilling it locally. Ray Serve
queues calls to a deployment that has no live replica until a replacement starts (~20 s
on a small box), so waiting for an answer is not an option. The breaker:

- **closed** (pool usable): remote prefill as normal. A call that fails because of the
  pool (dead replica, no answer) *opens* it. A call still unanswered after
  ``suspect_after_s`` makes the pool *suspect*: a probe (a no-op call) is due.
- **open** (pool down): every request prefills locally; probes run every
  ``probe_interval_s`` and the first one answered in time closes the breaker again.

When the breaker opens, calls still in flight give up at once and recompute locally
(``RemotePrefill`` waits on :attr:`PrefillPoolHealth.opened` next to each call).

Pure logic: no Ray, no asyncio loop needed to decide; ``now`` is passed in.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class HealthSettings:
    """How quickly the breaker reacts."""

    # A call unanswered this long makes the pool suspect (a probe is sent).
    suspect_after_s: float = 0.5
    # A probe unanswered this long counts as a failure (the breaker opens).
    probe_timeout_s: float = 1.0
    # While open (or suspect), at most one probe per this many seconds.
    probe_interval_s: float = 1.0


class PrefillPoolHealth:
    """The breaker state of one decode replica's view of the prefill pool."""

    def __init__(self, settings: HealthSettings | None = None) -> None:
        self.settings = settings or HealthSettings()
        self.is_open = False
        self.num_opened = 0
        self._last_probe_at = float("-inf")
        # Set while open: in-flight calls wait on it next to their answer.
        self.opened = asyncio.Event()

    def available(self) -> bool:
        """Send new requests to the pool?"""
        return not self.is_open

    def record_failure(self, now: float) -> None:
        """A call or probe failed because of the pool: open (idempotent)."""
        if not self.is_open:
            self.is_open = True
            self.num_opened += 1
            self.opened.set()
            # The next probe waits a full interval: a replacement needs time to start.
            self._last_probe_at = now

    def record_success(self, now: float) -> None:
        """A call or probe was answered: close."""
        if self.is_open:
            self.is_open = False
            self.opened.clear()

    def probe_due(self, now: float, oldest_call_started: float | None) -> bool:
        """Should a probe go out now? ``oldest_call_started``: start of the oldest unanswered call."""
        if now - self._last_probe_at < self.settings.probe_interval_s:
            return False
        if self.is_open:
            return True
        return oldest_call_started is not None and now - oldest_call_started >= self.settings.suspect_after_s

    def probe_sent(self, now: float) -> None:
        self._last_probe_at = now
