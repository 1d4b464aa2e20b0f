"""KV events: what an engine tells the global directory about its prompt cache.

Every store, touch, tier move and removal of a cached block becomes one event. The engine
appends events as they happen and the caller drains them with ``LLMEngine.take_events()``
as a :class:`KVEventBatch` stamped with ``(replica_id, seq_no, timestamp)``. ``seq_no`` is
per engine and has no gaps: a gap tells the directory it missed a batch and must ask the
replica for a snapshot (``LLMEngine.cache_snapshot()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from engine.block_hash import BlockHash


class Tier(IntEnum):
    """Memory tier a cached block lives in; lower is faster."""

    DEVICE = 0
    HOST = 1
    DISK = 2


@dataclass(frozen=True, slots=True)
class BlockStored:
    """New full blocks became cacheable, chained: ``hashes[0]``'s parent is ``parent``."""

    # Chained hashes of the stored blocks, in prompt order.
    hashes: tuple[BlockHash, ...]
    # Hash of the block before hashes[0]; None when hashes[0] is the prompt's first block.
    parent: BlockHash | None
    # Tier the blocks were stored in.
    tier: Tier
    # Absolute expiry (engine clock, seconds) shared by all the blocks.
    expires_at: float


@dataclass(frozen=True, slots=True)
class BlockTouched:
    """Cached blocks were hit again; their sliding TTL now ends at ``expires_at``."""

    hashes: tuple[BlockHash, ...]
    expires_at: float


@dataclass(frozen=True, slots=True)
class BlockMoved:
    """Cached blocks moved to another tier (demotion when they leave the device pool, or
    promotion back on a hit). A hash lives in exactly one tier of a replica at a time."""

    hashes: tuple[BlockHash, ...]
    # The tier the blocks are in now.
    tier: Tier
    # Their expiry in the new tier (each tier has its own TTL); None keeps the old expiry.
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks are gone (evicted, expired and reused, or cleared)."""

    hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """The replica dropped its whole prompt cache."""


KVEvent = BlockStored | BlockTouched | BlockMoved | BlockRemoved | AllCleared


@dataclass(slots=True)
class KVEventBatch:
    """Events of one or more engine steps, in order, from one replica."""

    # Replica that produced the events (the engine's ``replica_id``).
    replica_id: str
    # Per-replica batch counter, starting at 0, incremented by exactly one per batch.
    seq_no: int
    # Engine-clock time the batch was drained.
    timestamp: float
    # The events, oldest first.
    events: list[KVEvent] = field(default_factory=list)


@dataclass(slots=True)
class CacheSnapshot:
    """Everything a replica holds, for a directory that lost track (gap or restart)."""

    replica_id: str
    # seq_no of the last batch already folded into this snapshot (-1: none drained yet).
    seq_no: int
    timestamp: float
    # (hash, parent, tier, expires_at) of every cached block.
    blocks: list[tuple[BlockHash, BlockHash | None, Tier, float]] = field(default_factory=list)
