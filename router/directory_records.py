"""The directory's packed records: one small int per (block, holder), no per-entry objects.

A record is ``expiry_ms << EXP_SHIFT | tier << TIER_SHIFT | replica_idx``. The table maps
a block hash to one record (one holder, the common case) or a tuple of records (several
replicas hold the same block). These helpers read and write that table; ``KVDirectory``
(router/directory.py) owns it.
"""

from __future__ import annotations

import math

from engine.block_hash import BlockHash

REP_BITS = 16
TIER_SHIFT = 16
EXP_SHIFT = 18
REP_MASK = (1 << REP_BITS) - 1
# The tier and replica bits of a record (everything but the expiry).
LOW_MASK = (1 << EXP_SHIFT) - 1
# "Never expires" (pinned caches, +inf): ~8,900 years in ms, still a small int.
NEVER_MS = (1 << 48) - 1
MAX_REPLICAS = 1 << REP_BITS

Record = int
Table = dict[BlockHash, "Record | tuple[Record, ...]"]


def to_ms(t: float) -> int:
    """Seconds (engine clock) to the integer milliseconds the table stores."""
    if math.isnan(t):
        raise ValueError("expiry time is NaN")
    if t >= NEVER_MS / 1000.0:
        return NEVER_MS
    return max(0, int(t * 1000.0))


def pack(exp_ms: int, tier: int, rep: int) -> Record:
    return (exp_ms << EXP_SHIFT) | (tier << TIER_SHIFT) | rep


def find_record(table: Table, h: BlockHash, rep: int) -> Record | None:
    """The record of replica ``rep`` for block ``h``, if it holds it."""
    rec = table.get(h)
    if rec is None:
        return None
    if type(rec) is int:
        return rec if (rec & REP_MASK) == rep else None
    for p in rec:
        if (p & REP_MASK) == rep:
            return p
    return None


def tier_of(packed: Record) -> int:
    """The tier bits of a record (``engine.kv_events.Tier`` as an int)."""
    return (packed >> TIER_SHIFT) & 3


def put_record(table: Table, h: BlockHash, rep: int, packed: Record) -> Record | None:
    """Set the (h, rep) record; return the record it replaced (None: a new entry)."""
    rec = table.get(h)
    if rec is None:
        table[h] = packed
        return None
    if type(rec) is int:
        if (rec & REP_MASK) == rep:
            table[h] = packed
            return rec
        table[h] = (rec, packed)
        return None
    for i, p in enumerate(rec):
        if (p & REP_MASK) == rep:
            table[h] = rec[:i] + (packed,) + rec[i + 1 :]
            return p
    table[h] = rec + (packed,)
    return None


def remove_record(table: Table, h: BlockHash, rep: int) -> Record | None:
    """Drop replica ``rep``'s record of block ``h``; return it (None: there was none)."""
    rec = table.get(h)
    if rec is None:
        return None
    if type(rec) is int:
        if (rec & REP_MASK) != rep:
            return None
        del table[h]
        return rec
    gone = None
    rest = []
    for p in rec:
        if (p & REP_MASK) == rep:
            gone = p
        else:
            rest.append(p)
    if gone is not None:
        table[h] = rest[0] if len(rest) == 1 else tuple(rest)
    return gone
