"""The KV directory's value types: what ``KVDirectory`` (router/directory.py) answers.

``PrefixMatch`` is also what the routing policy (``router.policy``) and the speculative
routes (``router.speculative``) exchange, so it lives apart from the directory's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_events import Tier


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of a prompt's prefix one replica holds."""

    # Leading blocks of the prompt held (and unexpired) on the replica.
    num_blocks: int
    # Slowest tier among those blocks (DEVICE when num_blocks == 0).
    tier: Tier
    # Of the num_blocks, how many sit in each tier: (device, host, disk).
    blocks_per_tier: tuple[int, int, int] = (0, 0, 0)


@dataclass(slots=True)
class ApplyResult:
    """What ``apply`` learnt from one batch."""

    # Number of events folded in (0 for a duplicate / stale batch).
    num_events: int
    # True when the directory missed batches from this replica and wants a snapshot.
    snapshot_needed: bool


@dataclass(slots=True)
class DirectoryStats:
    """Sizes and counters for metrics."""

    num_entries: int
    num_hashes: int
    num_replicas: int
    num_expired: int
    num_gaps: int
    replicas_needing_snapshot: list[str] = field(default_factory=list)
    # (replica, block) entries per tier (device, host, disk); they sum to num_entries.
    entries_by_tier: tuple[int, int, int] = (0, 0, 0)
