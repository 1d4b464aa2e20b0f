"""The prefix walk behind ``KVDirectory.lookup``: a prompt's block chain against the packed table.

Pure function over the table ``router.directory_records`` describes (block hash -> one
packed record or a tuple of them); ``KVDirectory`` (router/directory.py) turns the
per-replica-index counts it returns into ``PrefixMatch`` values keyed by replica id.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import BlockHash
from router.directory_records import EXP_SHIFT, REP_MASK, TIER_SHIFT, Record, Table


def prefix_counts(table: Table, block_hashes: Sequence[BlockHash], now_ms: int) -> dict[int, list[int]]:
    """Per replica index holding ``block_hashes[0]`` unexpired: ``[num_blocks, device, host, disk]``.

    ``num_blocks`` counts the leading blocks the replica holds with an expiry after
    ``now_ms``; the other three split that count by tier. Replicas that hold the first
    block but whose run ends at zero blocks still appear (with zero counts).
    """
    if not block_hashes:
        return {}
    get = table.get
    prev = get(block_hashes[0])
    if prev is None:
        return {}
    # replica idx -> [num_blocks, device, host, disk] for chains still unbroken.
    alive: dict[int, list[int]] = {}
    for p in (prev,) if type(prev) is int else prev:
        if (p >> EXP_SHIFT) > now_ms:
            alive[p & REP_MASK] = [0, 0, 0, 0]
    done: dict[int, list[int]] = {}
    # Blocks stored (or touched) together carry the very same record, so a prompt is
    # a few runs of equal records: compare with the previous one and count the run;
    # holders are only re-examined where the record changes (~one dict get per block).
    run = 1
    for h in block_hashes[1:]:
        if not alive:
            break
        rec = get(h)
        if rec == prev:
            run += 1
            continue
        _credit(alive, prev, run)
        run = 0
        if rec is None:
            break
        still: dict[int, list[int]] = {}
        for p in (rec,) if type(rec) is int else rec:
            counts = alive.pop(p & REP_MASK, None)
            if counts is not None and (p >> EXP_SHIFT) > now_ms:
                still[p & REP_MASK] = counts
            elif counts is not None:
                done[p & REP_MASK] = counts
        done.update(alive)
        alive = still
        prev = rec
        run = 1
    if run:
        _credit(alive, prev, run)
    done.update(alive)
    return done


def _credit(alive: dict[int, list[int]], rec: Record | tuple[Record, ...], run: int) -> None:
    """Add a run of ``run`` equal records to the counts of the replicas in ``alive``."""
    for p in (rec,) if type(rec) is int else rec:
        counts = alive.get(p & REP_MASK)
        if counts is not None:
            counts[0] += run
            counts[1 + ((p >> TIER_SHIFT) & 3)] += run
