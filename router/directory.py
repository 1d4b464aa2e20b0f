"""The global KV directory: which replica holds which prompt block, in which tier, until when.

A plain class with no I/O and an explicit ``now`` (engine-clock seconds) on every
time-dependent method, so tests drive it with a fake clock; ``router.directory_actor``
wraps it in a Ray actor.

Memory layout (1M resident blocks must stay well under 256 bytes each):

* Replica ids are interned to small ints (``_rep_ids``), at most 65,536 replicas.
* ``_table`` maps a block hash to one *packed int* per holder:
  ``expiry_ms << 18 | tier << 16 | replica_idx``; with several holders the value is a
  tuple of packed ints. No per-entry objects besides the (shared) hash key and one int.
  The record helpers live in ``router.directory_records``; the prefix walk behind
  ``lookup`` lives in ``router.directory_match``; the value types it answers with
  (``PrefixMatch``, ``DirectoryStats``) in ``router.directory_types``.
* Expiry order lives in ``_buckets``: exact ``expiry_ms`` -> (list of hashes, array of
  replica indexes), plus a min-heap of bucket keys. Touches, and tier moves that carry
  the block's expiry in its new tier (``BlockMoved.expires_at``: a block demoted to host
  memory lives on for the host tier's TTL), re-file an entry lazily: the old bucket slot
  becomes stale and is skipped when swept (a slot is live only if the table still records
  that very expiry for that replica).

Tiers: a hash lives in exactly one tier of a replica at a time; each record carries that
tier, and ``lookup`` splits a replica's match by tier so the policy can charge a host or
disk hit its promote cost (``router.policy``).

Sweeping pops buckets in expiry order, so the oldest entries go first (``limit`` makes a
sweep incremental). ``lookup`` also hides expired-but-unswept entries, so a lazy sweep
never returns a block past its TTL.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.block_hash import BlockHash
from engine.kv_events import (
    AllCleared,
    BlockMoved,
    BlockRemoved,
    BlockStored,
    BlockTouched,
    CacheSnapshot,
    KVEventBatch,
    Tier,
)
from router.directory_match import prefix_counts
from router.directory_types import ApplyResult, DirectoryStats, PrefixMatch
from router.directory_records import (
    EXP_SHIFT,
    LOW_MASK,
    MAX_REPLICAS,
    NEVER_MS,
    REP_MASK,
    TIER_SHIFT,
    find_record,
    put_record,
    remove_record,
    tier_of,
    to_ms,
)


@dataclass(slots=True)
class _ReplicaState:
    # seq_no of the last batch applied; None until the first batch or snapshot.
    last_seq_no: int | None = None
    # Number of (block, this replica) entries resident.
    num_blocks: int = 0


__all__ = ["ApplyResult", "DirectoryStats", "KVDirectory", "PrefixMatch"]


class KVDirectory:
    """Which replica holds which block; see the module docstring for the layout."""

    def __init__(self) -> None:
        self._table: dict[BlockHash, int | tuple[int, ...]] = {}
        self._rep_ids: list[str | None] = []  # idx -> replica id (None: freed slot)
        self._rep_idx: dict[str, int] = {}
        self._free_idx: list[int] = []
        self._replicas: dict[str, _ReplicaState] = {}
        self._buckets: dict[int, tuple[list[BlockHash], array]] = {}
        self._bucket_heap: list[int] = []
        self._needs_snapshot: set[str] = set()
        self._num_entries = 0
        self._tier_entries = [0, 0, 0]  # entries per tier, for metrics
        self._num_expired = 0
        self._num_gaps = 0

    # ------------------------------------------------------------------ events

    def apply(self, batch: KVEventBatch) -> ApplyResult:
        """Fold one replica's event batch in; detect gaps in its ``seq_no``.

        A duplicate or older batch is ignored. After a gap (or, for a directory that
        restarted, a first batch that is not seq_no 0) the events are still applied —
        stores and removals are absolute facts — but the replica is marked for a
        snapshot, which the caller should fetch and pass to :meth:`restore`.
        """
        if batch.seq_no < 0:
            raise ValueError(f"seq_no must be >= 0, got {batch.seq_no}")
        state = self._replicas.get(batch.replica_id)
        if state is None:
            state = self._replicas[batch.replica_id] = _ReplicaState()
        last = state.last_seq_no
        if last is not None and batch.seq_no <= last:
            return ApplyResult(0, batch.replica_id in self._needs_snapshot)
        expected = 0 if last is None else last + 1
        if batch.seq_no != expected:
            self._num_gaps += 1
            self._needs_snapshot.add(batch.replica_id)
        state.last_seq_no = batch.seq_no
        rep = self._intern(batch.replica_id)
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._store(rep, ev.hashes, int(ev.tier), to_ms(ev.expires_at))
            elif isinstance(ev, BlockTouched):
                self._touch(rep, ev.hashes, to_ms(ev.expires_at))
            elif isinstance(ev, BlockMoved):
                exp = None if ev.expires_at is None else to_ms(ev.expires_at)
                self._move(rep, ev.hashes, int(ev.tier), exp)
            elif isinstance(ev, BlockRemoved):
                for h in ev.hashes:
                    self._remove(rep, h)
            elif isinstance(ev, AllCleared):
                self._clear_replica(rep)
            else:
                raise ValueError(f"unknown KV event {type(ev).__name__}")
        return ApplyResult(len(batch.events), batch.replica_id in self._needs_snapshot)

    def needs_snapshot(self, replica_id: str) -> bool:
        """Whether this replica's state is known to be incomplete."""
        return replica_id in self._needs_snapshot

    def replicas_needing_snapshot(self) -> list[str]:
        """Replicas whose snapshot the directory is waiting for, sorted."""
        return sorted(self._needs_snapshot)

    # ------------------------------------------------------------------ queries

    def lookup(self, block_hashes: Sequence[BlockHash], now: float) -> dict[str, PrefixMatch]:
        """Per replica holding ``block_hashes[0]``: how many leading blocks it holds.

        Entries past their expiry are invisible even if not swept yet.
        """
        if not block_hashes:
            return {}
        now_ms = min(to_ms(now), NEVER_MS - 1)  # pinned entries outlive any clock
        out: dict[str, PrefixMatch] = {}
        for rep, (n, d, ho, dk) in prefix_counts(self._table, block_hashes, now_ms).items():
            if n == 0:
                continue
            tier = Tier.DISK if dk else Tier.HOST if ho else Tier.DEVICE
            rid = self._rep_ids[rep]
            if rid is not None:
                out[rid] = PrefixMatch(n, tier, (d, ho, dk))
        return out

    def replica_ids(self) -> list[str]:
        """Replicas the directory has heard from, sorted."""
        return sorted(self._replicas)

    def num_blocks(self, replica_id: str) -> int:
        """Resident (block, replica) entries of one replica (expired-unswept included)."""
        state = self._replicas.get(replica_id)
        return 0 if state is None else state.num_blocks

    def __len__(self) -> int:
        """Number of (block, replica) entries resident."""
        return self._num_entries

    def stats(self) -> DirectoryStats:
        """Sizes and counters for metrics."""
        return DirectoryStats(
            num_entries=self._num_entries,
            num_hashes=len(self._table),
            num_replicas=len(self._replicas),
            num_expired=self._num_expired,
            num_gaps=self._num_gaps,
            replicas_needing_snapshot=self.replicas_needing_snapshot(),
            entries_by_tier=(self._tier_entries[0], self._tier_entries[1], self._tier_entries[2]),
        )

    # ------------------------------------------------------------------ maintenance

    def sweep(self, now: float, limit: int | None = None) -> int:
        """Remove entries with ``expires_at <= now``, oldest first; return how many.

        ``limit`` bounds the work of one call (the actor sweeps in slices so lookups
        are never stalled behind a huge expiry wave).
        """
        now_ms = min(to_ms(now), NEVER_MS - 1)  # pinned entries outlive any clock
        heap = self._bucket_heap
        removed = 0
        while heap and heap[0] <= now_ms:
            if limit is not None and removed >= limit:
                break
            exp = heap[0]
            hashes, reps = self._buckets[exp]
            i = 0
            n = len(hashes)
            while i < n:
                if limit is not None and removed >= limit:
                    break
                h, rep = hashes[i], reps[i]
                i += 1
                p = find_record(self._table, h, rep)
                # Stale slot (touched since, moved to another bucket, or removed).
                if p is None or (p >> EXP_SHIFT) != exp:
                    continue
                self._remove(rep, h)
                self._num_expired += 1
                removed += 1
            if i < n:
                del hashes[:i]
                del reps[:i]
                break
            heapq.heappop(heap)
            del self._buckets[exp]
        return removed

    def drop_replica(self, replica_id: str) -> int:
        """Forget a replica entirely (it died or scaled down); return entries removed.

        O(resident entries): replicas leave rarely and a per-replica index would cost
        more memory per block than the whole packed record.
        """
        idx = self._rep_idx.get(replica_id)
        n = 0
        if idx is not None:
            n = self._clear_replica(idx)
            del self._rep_idx[replica_id]
            self._rep_ids[idx] = None
            self._free_idx.append(idx)
        self._replicas.pop(replica_id, None)
        self._needs_snapshot.discard(replica_id)
        return n

    def snapshot(self) -> list[CacheSnapshot]:
        """Everything the directory knows, one engine-format snapshot per replica.

        Parents are not kept (lookups walk the request's own chain), so they are None.
        """
        per_rep: dict[int, list[tuple[BlockHash, BlockHash | None, Tier, float]]] = {
            idx: [] for idx in self._rep_idx.values()
        }
        for h, rec in self._table.items():
            for p in (rec,) if type(rec) is int else rec:
                exp = p >> EXP_SHIFT
                exp_s = math.inf if exp == NEVER_MS else exp / 1000.0
                per_rep[p & REP_MASK].append((h, None, Tier(tier_of(p)), exp_s))
        out = []
        for rid, state in sorted(self._replicas.items()):
            idx = self._rep_idx.get(rid)
            blocks = per_rep.get(idx, []) if idx is not None else []
            seq = -1 if state.last_seq_no is None else state.last_seq_no
            out.append(CacheSnapshot(replica_id=rid, seq_no=seq, timestamp=0.0, blocks=blocks))
        return out

    def restore(self, snapshots: CacheSnapshot | Iterable[CacheSnapshot]) -> int:
        """Replace each snapshot's replica state by the snapshot; return entries loaded.

        Accepts an engine's ``LLMEngine.cache_snapshot()`` (after a gap or a directory
        restart) or the output of :meth:`snapshot`. Batches up to the snapshot's
        ``seq_no`` are then considered applied.
        """
        if isinstance(snapshots, CacheSnapshot):
            snapshots = [snapshots]
        loaded = 0
        for snap in snapshots:
            idx = self._rep_idx.get(snap.replica_id)
            if idx is not None:
                self._clear_replica(idx)
            rep = self._intern(snap.replica_id)
            state = self._replicas.setdefault(snap.replica_id, _ReplicaState())
            state.last_seq_no = snap.seq_no if snap.seq_no >= 0 else None
            self._needs_snapshot.discard(snap.replica_id)
            for h, _parent, tier, expires_at in snap.blocks:
                self._store(rep, (h,), int(tier), to_ms(expires_at))
                loaded += 1
        return loaded

    # ------------------------------------------------------------------ internals

    def _intern(self, replica_id: str) -> int:
        idx = self._rep_idx.get(replica_id)
        if idx is not None:
            return idx
        if self._free_idx:
            idx = self._free_idx.pop()
            self._rep_ids[idx] = replica_id
        else:
            idx = len(self._rep_ids)
            if idx >= MAX_REPLICAS:
                raise RuntimeError(f"more than {MAX_REPLICAS} replicas in one directory")
            self._rep_ids.append(replica_id)
        self._rep_idx[replica_id] = idx
        return idx

    def _file(self, h: BlockHash, rep: int, exp_ms: int) -> None:
        bucket = self._buckets.get(exp_ms)
        if bucket is None:
            bucket = self._buckets[exp_ms] = ([], array("H"))
            heapq.heappush(self._bucket_heap, exp_ms)
        bucket[0].append(h)
        bucket[1].append(rep)

    def _store(self, rep: int, hashes: Sequence[BlockHash], tier: int, exp_ms: int) -> None:
        low = (tier << TIER_SHIFT) | rep
        packed = (exp_ms << EXP_SHIFT) | low
        tiers = self._tier_entries
        new = 0
        for h in hashes:
            old = put_record(self._table, h, rep, packed)
            if old is None:
                new += 1
            else:
                tiers[tier_of(old)] -= 1  # re-stored, possibly into another tier
            self._file(h, rep, exp_ms)
        tiers[tier] += len(hashes)
        self._num_entries += new
        rid = self._rep_ids[rep]
        assert rid is not None
        self._replicas[rid].num_blocks += new

    def _touch(self, rep: int, hashes: Sequence[BlockHash], exp_ms: int) -> None:
        for h in hashes:
            p = find_record(self._table, h, rep)
            if p is None:
                continue  # touch of a block we never saw (we missed it; a gap says so)
            put_record(self._table, h, rep, (exp_ms << EXP_SHIFT) | (p & LOW_MASK))
            self._file(h, rep, exp_ms)

    def _move(self, rep: int, hashes: Sequence[BlockHash], tier: int, exp_ms: int | None) -> None:
        """Re-tier blocks; a new expiry (each tier has its own TTL) re-files them for sweep."""
        tiers = self._tier_entries
        for h in hashes:
            p = find_record(self._table, h, rep)
            if p is None:
                continue  # moved before we saw it stored (we missed it; a gap says so)
            exp = p >> EXP_SHIFT if exp_ms is None else exp_ms
            put_record(self._table, h, rep, (exp << EXP_SHIFT) | (tier << TIER_SHIFT) | rep)
            tiers[tier_of(p)] -= 1
            tiers[tier] += 1
            if exp_ms is not None and exp_ms != p >> EXP_SHIFT:
                # The old bucket slot turns stale (its expiry no longer matches the table).
                self._file(h, rep, exp_ms)

    def _remove(self, rep: int, h: BlockHash) -> bool:
        old = remove_record(self._table, h, rep)
        if old is None:
            return False
        self._tier_entries[tier_of(old)] -= 1
        self._num_entries -= 1
        rid = self._rep_ids[rep]
        if rid is not None and rid in self._replicas:
            self._replicas[rid].num_blocks -= 1
        return True

    def _clear_replica(self, rep: int) -> int:
        table = self._table
        victims = []
        for h, rec in table.items():
            if type(rec) is int:
                if (rec & REP_MASK) == rep:
                    victims.append(h)
            elif any((p & REP_MASK) == rep for p in rec):
                victims.append(h)
        for h in victims:
            self._remove(rep, h)
        # Bucket slots of this replica become stale; sweep skips them (checks the table).
        return len(victims)
