"""``TieredKV``: the host and disk tiers behind one engine's device pool.

It is the pool's ``lower_tiers`` (``engine.block_pool.LowerTiers``):

* **Demotion.** A cached block leaving the device (for room, or at its device TTL) goes
  to the first lower tier that can still hold it (``engine.kv_tiers.lifetimes``): a host
  row, else a disk file, else it is dropped. A host tier that is full makes room by
  demoting its least recently used block to disk the same way. Each move is one
  ``BlockMoved(hashes, tier, expires_at)``; each drop a ``BlockRemoved``.
* **Promotion.** A prefix hit in a lower tier (:meth:`find`) is brought back by
  :meth:`promote`: fresh device blocks are adopted into the prompt cache as *pending*,
  the copies start (host rows at once; disk files on the IO thread), and
  ``BlockMoved(..., DEVICE, ...)`` is emitted. Requests holding a pending block wait
  (``WAITING_FOR_KV_PROMOTION``) while others run; :meth:`poll` finishes jobs each step.
  A block whose file turns out corrupt or gone is uncached (``BlockRemoved``): a miss.
* **Expiry.** :meth:`poll` also expires each tier: the device's blocks past their device
  TTL are demoted, host blocks past theirs move to disk or go, disk blocks are deleted.

A hash lives in exactly one tier at a time: when the device stores a hash a lower tier
still holds (a request recomputed it), the lower copy is dropped first (``supersede``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from engine.block_hash import BlockHash
from engine.block_pool import BlockPool, KVBlock
from engine.kv_events import BlockMoved, BlockRemoved, BlockStored, Tier
from engine.kv_tiers.block_copy import BlockCopier, CopyDone
from engine.kv_tiers.disk_tier import DiskOp, DiskTier
from engine.kv_tiers.host_tier import HostTier
from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tier_index import TierEntry
from engine.outputs import TierStats

_RECENT_LATENCIES = 256


@dataclass(frozen=True, slots=True)
class LowerHit:
    """A prompt block found in a lower tier."""

    tier: Tier
    entry: TierEntry


@dataclass(eq=False)
class PromotionJob:
    """Device blocks being filled from lower tiers; the job holds one reference on each."""

    blocks: list[KVBlock]
    host_copy: CopyDone
    # Disk reads, each with the device block it fills; copied in once all are read.
    disk_reads: list[tuple[KVBlock, DiskOp]]
    started: float = field(default_factory=time.perf_counter)
    disk_copy: CopyDone | None = None


class TieredKV:
    """Demotes, promotes and expires cached blocks across device, host and disk."""

    def __init__(self, pool: BlockPool, copier: BlockCopier, lifetimes: TierLifetimes,
                 host: HostTier | None, disk: DiskTier | None) -> None:
        self.pool = pool
        self.copier = copier
        self.lifetimes = lifetimes
        self.host = host
        self.disk = disk
        self.jobs: list[PromotionJob] = []
        self.counters = TierStats(block_bytes=copier.block_nbytes)
        self._latencies: deque[float] = deque(maxlen=_RECENT_LATENCIES)
        pool.lower_tiers = self

    def adopt_disk_files(self, now: float) -> int:
        """A new engine adopts the disk tier's existing files (``BlockStored(DISK)`` each)."""
        if self.disk is None:
            return 0
        adopted = self.disk.load(now, self.lifetimes)
        for e in adopted:
            self.pool.emit(BlockStored((e.block_hash,), e.parent_hash, Tier.DISK, e.expires_at))
        return len(adopted)

    # ------------------------------------------------------------- demotion
    def demote(self, blocks: list[KVBlock], now: float, reason: str) -> None:
        """Cached device blocks leave the device: move each down a tier, or drop it."""
        to_host: list[tuple[KVBlock, TierEntry]] = []
        to_disk: list[tuple[KVBlock, TierEntry]] = []
        dropped: list[BlockHash] = []
        for b in blocks:
            entry = TierEntry(b.block_hash, b.parent_hash, b.token_ids, b.ttl_s, b.last_used_at, 0.0)
            target = self.lifetimes.demotion_target(Tier.DEVICE, b.last_used_at, b.ttl_s, now)
            if target is not None and target[0] == Tier.HOST:
                row = self._host_row(now)
                if row is not None:
                    entry.expires_at, entry.slot = target[1], row
                    to_host.append((b, entry))
                    continue
                target = self.lifetimes.demotion_target(Tier.HOST, b.last_used_at, b.ttl_s, now)
            if target is None or self.disk.backlogged:
                dropped.append(b.block_hash)
            else:
                entry.expires_at = target[1]
                to_disk.append((b, entry))
        if to_host:
            ids, rows = [b.block_id for b, _ in to_host], [e.slot for _, e in to_host]
            done = self.copier.to_host(ids, self.host.storage, rows)
            for _, e in to_host:
                self.host.index.add(e)
                self.host.landing(e.slot, done)
            self.counters.num_demoted_to_host += len(to_host)
            self._emit_moved([e for _, e in to_host], Tier.HOST)
        if to_disk:
            payload = self.copier.to_cpu([b.block_id for b, _ in to_disk])
            for i, (_, e) in enumerate(to_disk):
                self.disk.put(e, payload[i], now)
            self.counters.num_demoted_to_disk += len(to_disk)
            self._emit_moved([e for _, e in to_disk], Tier.DISK)
        if dropped:
            self.pool.emit(BlockRemoved(tuple(dropped)))

    def _host_row(self, now: float) -> int | None:
        """A free host row, making room by demoting the host's LRU block if needed."""
        row = self.host.take_row()
        if row is None:
            victim = self.host.index.pop_lru()
            if victim is not None:
                self.counters.num_host_evicted += 1
                self._leave_host([victim], now)
                row = self.host.take_row()
        return row

    def _leave_host(self, entries: list[TierEntry], now: float) -> None:
        """Host entries (already out of the index) move to disk or are dropped."""
        moved, dropped = [], []
        for e in entries:
            target = self.lifetimes.demotion_target(Tier.HOST, e.last_used_at, e.ttl_s, now)
            if target is None or self.disk.backlogged:
                dropped.append(e.block_hash)
            else:
                payload = self.host.read_row(e.slot)
                d = TierEntry(e.block_hash, e.parent_hash, e.token_ids, e.ttl_s, e.last_used_at, target[1])
                self.disk.put(d, payload, now)
                moved.append(d)
            self.host.release_row(e.slot)
        if moved:
            self.counters.num_demoted_to_disk += len(moved)
            self._emit_moved(moved, Tier.DISK)
        if dropped:
            self.pool.emit(BlockRemoved(tuple(dropped)))

    def supersede(self, hashes: Sequence[BlockHash]) -> None:
        """The device stores ``hashes``: lower tiers drop their copies first."""
        removed = []
        for h in hashes:
            if self.host is not None and (e := self.host.index.pop(h)) is not None:
                self.host.release_row(e.slot)
                removed.append(h)
            elif self.disk is not None and (e := self.disk.index.entries.get(h)) is not None:
                self.disk.drop(e)
                removed.append(h)
        if removed:
            self.pool.emit(BlockRemoved(tuple(removed)))

    # ------------------------------------------------------------ promotion
    def find(self, block_hash: BlockHash, token_ids: Sequence[int], now: float) -> LowerHit | None:
        """The lower-tier copy of a prompt block, or None."""
        if self.host is not None and (e := self.host.index.get(block_hash, token_ids, now)) is not None:
            return LowerHit(Tier.HOST, e)
        if self.disk is not None and (e := self.disk.index.get(block_hash, token_ids, now)) is not None:
            return LowerHit(Tier.DISK, e)
        return None

    def promote(self, hits: Sequence[LowerHit], now: float) -> list[KVBlock]:
        """Bring ``hits`` back to fresh device blocks (pending until their KV lands); the
        caller has checked that the pool has ``len(hits)`` free blocks."""
        disk_ops: list[DiskOp] = []
        rows: list[int] = []
        for hit in hits:  # out of their tiers first, so making room below cannot evict them
            if hit.tier == Tier.HOST:
                self.host.index.pop(hit.entry.block_hash)
                rows.append(hit.entry.slot)
            else:
                disk_ops.append(self.disk.take(hit.entry))
        blocks = self.pool.allocate(len(hits), now)
        if blocks is None:
            raise RuntimeError("pool refused blocks for a promotion the scheduler approved")
        for b, hit in zip(blocks, hits):
            e = hit.entry
            self.pool.adopt(b, (e.block_hash, e.parent_hash, e.token_ids), e.ttl_s, now)
        host_blocks = [b for b, hit in zip(blocks, hits) if hit.tier == Tier.HOST]
        disk_blocks = [b for b, hit in zip(blocks, hits) if hit.tier == Tier.DISK]
        host_copy = self.copier.to_device(self.host.storage, rows, [b.block_id for b in host_blocks]) if rows \
            else CopyDone()
        for row in rows:
            self.host.release_row(row, after=host_copy)
        self.counters.num_promoted_from_host += len(host_blocks)
        self.counters.num_promoted_from_disk += len(disk_blocks)
        self._emit_moved_blocks(blocks)
        job = PromotionJob(blocks, host_copy, list(zip(disk_blocks, disk_ops)))
        self.jobs.append(job)
        self._progress(job, now)
        return blocks

    def _progress(self, job: PromotionJob, now: float) -> bool:
        """Advance one job; True (and its references released) once it is finished."""
        if job.disk_reads and job.disk_copy is None:
            if not all(op.done() for _, op in job.disk_reads):
                return False
            good = [(b, op.payload) for b, op in job.disk_reads if op.payload is not None]
            for b, op in job.disk_reads:
                if op.payload is None:
                    self.counters.num_failed_promotions += 1
                    self.pool.drop_failed(b)
            job.disk_copy = CopyDone()
            if good:
                job.disk_copy = self.copier.to_device(
                    torch.stack([p for _, p in good]), range(len(good)), [b.block_id for b, _ in good]
                )
        if not job.host_copy.done() or (job.disk_copy is not None and not job.disk_copy.done()):
            return False
        for b in job.blocks:
            b.pending = False
        self.pool.free(job.blocks, now)
        self.jobs.remove(job)
        self._latencies.append(time.perf_counter() - job.started)
        self.counters.num_promotions += 1
        return True

    def wait_for_progress(self, timeout_s: float) -> None:
        """Block briefly until a promotion may have progressed (the engine had nothing to run)."""
        for job in self.jobs:
            if job.disk_reads and job.disk_copy is None:
                if self.disk.wake.wait(timeout_s):
                    self.disk.wake.clear()
                return
            job.host_copy.wait()
            if job.disk_copy is not None:
                job.disk_copy.wait()
            return

    # --------------------------------------------------------------- upkeep
    def poll(self, now: float) -> None:
        """Once per step: finish promotions, expire every tier, learn of disk losses."""
        for job in list(self.jobs):
            self._progress(job, now)
        self.pool.expire(now)  # device blocks past their device TTL are demoted
        if self.host is not None:
            self.host.poll()
            expired = self.host.index.pop_expired(now)
            if expired:
                self.counters.num_host_expired += len(expired)
                self._leave_host(expired, now)
        if self.disk is not None:
            lost = self.disk.poll()
            expired = self.disk.index.pop_expired(now)
            for e in expired:
                self.disk.drop(e)
            self.counters.num_disk_evicted += len(lost)
            self.counters.num_disk_expired += len(expired)
            gone = tuple(e.block_hash for e in lost + expired)
            if gone:
                self.pool.emit(BlockRemoved(gone))

    def entries(self, now: float) -> list[tuple[BlockHash, BlockHash | None, Tier, float]]:
        """(hash, parent, tier, expires_at) of every unexpired host and disk block."""
        out = []
        for tier, store in ((Tier.HOST, self.host), (Tier.DISK, self.disk)):
            if store is not None:
                out += [(h, e.parent_hash, tier, e.expires_at) for h, e in store.index.entries.items()
                        if e.expires_at > now]
        return out

    def clear(self) -> None:
        """Forget every host and disk block (the pool has emitted AllCleared)."""
        if self.host is not None:
            for e in self.host.index.clear():
                self.host.release_row(e.slot)
        if self.disk is not None:
            self.disk.forget_all()

    def stats(self) -> TierStats:
        c = self.counters
        c.recent_promote_seconds = tuple(self._latencies)
        if self.host is not None:
            c.host_capacity_blocks, c.host_blocks = self.host.capacity, len(self.host.index)
            c.host_busy_blocks = self.host.num_busy_rows
        if self.disk is not None:
            c.disk_capacity_bytes = self.disk.budget.capacity_bytes
            c.disk_blocks, c.disk_bytes = len(self.disk.index), self.disk.nbytes
        return replace(c)

    def close(self) -> None:
        """Finish queued disk writes (a restarted engine finds them) and stop the IO thread."""
        if self.disk is not None:
            self.disk.close()

    # ---------------------------------------------------------------- events
    def _emit_moved(self, entries: list[TierEntry], tier: Tier) -> None:
        by_expiry: dict[float, list[BlockHash]] = {}
        for e in entries:
            by_expiry.setdefault(e.expires_at, []).append(e.block_hash)
        for expires_at, hashes in by_expiry.items():
            self.pool.emit(BlockMoved(tuple(hashes), tier, expires_at))

    def _emit_moved_blocks(self, blocks: list[KVBlock]) -> None:
        by_expiry: dict[float, list[BlockHash]] = {}
        for b in blocks:
            by_expiry.setdefault(b.expires_at, []).append(b.block_hash)
        for expires_at, hashes in by_expiry.items():
            self.pool.emit(BlockMoved(tuple(hashes), Tier.DEVICE, expires_at))
