"""KV tiers behind the device pool: host memory and local disk (docs/kv_tiers.md).

A cached block leaving the device is demoted to host memory, and from there to disk,
instead of dropped; a prefix hit in a lower tier promotes its blocks back. Each tier has
its own capacity and TTL (``lifetimes``). ``TieredKV`` (``tiered_kv``) ties them to the
engine's ``BlockPool``; ``build.build_tiers`` makes one from an ``EngineConfig``.

Modules: ``lifetimes`` (which tier may hold a block until when), ``tier_index`` (one lower
tier's bookkeeping), ``block_copy`` (device <-> host copies, a side stream on CUDA),
``host_tier``, ``disk_tier`` (+ ``block_file``, ``disk_budget``, ``fingerprint``).
"""

from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tiered_kv import LowerHit, TieredKV

__all__ = ["LowerHit", "TierLifetimes", "TieredKV"]
