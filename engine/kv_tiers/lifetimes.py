"""Which tier may hold a cached block, and until when: pure arithmetic on a block's lifetime.

A block's *lifetime* is the TTL its requests asked for (``prompt_cache_retention``,
Anthropic ``cache_control.ttl``, an explicit cache; the engine default otherwise), sliding
from its last use. Each tier also has a TTL of its own: the longest a block may sit in
that tier idle. A block lives in whichever tier can still hold it:

    expiry in tier t = last_used_at + min(lifetime, tier TTL of t)

so a 1 h block may leave the device after 5 idle minutes and stay in host memory until
its hour is up, while a 5 min block is never demoted by age (its lifetime ends with its
device TTL), only by capacity. The device TTL applies only when a lower tier exists:
without one the device keeps a block its whole lifetime, as a single-tier cache does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.kv_events import Tier


@dataclass(frozen=True, slots=True)
class TierLifetimes:
    """The tiers an engine has and their TTLs (seconds)."""

    host_enabled: bool
    disk_enabled: bool
    device_ttl_s: float = 300.0
    host_ttl_s: float = 3600.0
    disk_ttl_s: float = 86400.0

    @property
    def has_lower_tier(self) -> bool:
        return self.host_enabled or self.disk_enabled

    def cap(self, tier: Tier) -> float:
        """Longest idle time a block may spend in ``tier``."""
        if tier == Tier.DEVICE:
            return self.device_ttl_s if self.has_lower_tier else math.inf
        return self.host_ttl_s if tier == Tier.HOST else self.disk_ttl_s

    def expiry(self, tier: Tier, last_used_at: float, ttl_s: float) -> float:
        """When a block last used at ``last_used_at`` with lifetime ``ttl_s`` leaves ``tier``."""
        return last_used_at + min(ttl_s, self.cap(tier))

    def enabled(self, tier: Tier) -> bool:
        return tier == Tier.DEVICE or (self.host_enabled if tier == Tier.HOST else self.disk_enabled)

    def demotion_target(self, source: Tier, last_used_at: float, ttl_s: float, now: float) -> tuple[Tier, float] | None:
        """The first enabled tier below ``source`` that can still hold the block at ``now``,
        with the block's expiry there; None when its lifetime is over in every lower tier."""
        for tier in (Tier.HOST, Tier.DISK):
            if tier <= source or not self.enabled(tier):
                continue
            expires_at = self.expiry(tier, last_used_at, ttl_s)
            if expires_at > now:
                return tier, expires_at
        return None
