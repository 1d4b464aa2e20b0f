"""Building an engine's lower tiers from its ``EngineConfig`` (``host_kv_bytes``,
``disk_kv_dir``, ``disk_kv_bytes`` and the per-tier TTLs)."""

from __future__ import annotations

import torch

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.kv_tiers.block_copy import BlockCopier
from engine.kv_tiers.disk_tier import DiskTier
from engine.kv_tiers.fingerprint import kv_fingerprint, weights_digest
from engine.kv_tiers.host_tier import HostTier
from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tiered_kv import TieredKV


def tier_lifetimes(config: EngineConfig) -> TierLifetimes:
    """Which tiers ``config`` turns on, and their TTLs."""
    return TierLifetimes(
        host_enabled=config.host_kv_bytes > 0,
        disk_enabled=config.disk_kv_dir is not None,
        device_ttl_s=config.device_ttl_s,
        host_ttl_s=config.host_ttl_s,
        disk_ttl_s=config.disk_ttl_s,
    )


def build_tiers(
    config: EngineConfig,
    pool: BlockPool,
    kv_cache: torch.Tensor,
    model: torch.nn.Module,
    model_id: str,
    now: float,
) -> TieredKV | None:
    """The engine's ``TieredKV``, or None when it has neither a host nor a disk tier.

    A disk tier adopts the block files a previous engine with the same fingerprint left
    (``now``: the engine clock, to age them)."""
    lifetimes = tier_lifetimes(config)
    if not lifetimes.has_lower_tier:
        return None
    copier = BlockCopier(kv_cache)
    host = None
    if lifetimes.host_enabled:
        rows = config.host_kv_bytes // copier.block_nbytes
        if rows < 1:
            raise ValueError(
                f"host_kv_bytes={config.host_kv_bytes} holds no KV block of {copier.block_nbytes} bytes "
                "(0 turns the host tier off)"
            )
        host = HostTier(copier.host_buffer(rows))
    disk = None
    if lifetimes.disk_enabled:
        fingerprint = kv_fingerprint(
            model_id, kv_cache.dtype, config.block_size, tuple(copier.block_shape), weights_digest(model)
        )
        disk = DiskTier(config.disk_kv_dir, config.disk_kv_bytes, fingerprint, copier.block_shape, kv_cache.dtype)
    tiers = TieredKV(pool, copier, lifetimes, host, disk)
    tiers.adopt_disk_files(now)
    return tiers

