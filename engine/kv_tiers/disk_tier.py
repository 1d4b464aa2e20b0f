"""The disk tier: KV blocks as files under ``<disk_kv_dir>/<fingerprint>/``, and their index.

The engine's thread owns the index (what this engine believes is on disk); one background
thread does all file IO, so the step loop never waits on the disk. Operations run in
order, except that reads (promotions, which a request waits for) jump the queue of
writes and deletes. That is safe because a block is only ever read after its write has
completed: a promotion of a block whose write is still queued takes the bytes from memory
and cancels the write (a delete queued behind it removes the file if it was written).

A new engine on the same directory and fingerprint adopts the files it finds
(:meth:`DiskTier.load`); any file that is partial, corrupt or unreadable is a miss and is
deleted. Files are removed when promoted (a block lives in one tier at a time), when their
TTL runs out, or when the shared byte budget (``engine.kv_tiers.disk_budget``) needs room.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.block_hash import BlockHash
from engine.kv_events import Tier
from engine.kv_tiers.block_file import (
    BlockFileError,
    BlockFileHeader,
    block_path,
    hash_of_path,
    read_block_file,
    read_header,
    write_block_file,
)
from engine.kv_tiers.disk_budget import DiskBudget
from engine.kv_tiers.lifetimes import TierLifetimes
from engine.kv_tiers.tier_index import TierEntry, TierIndex

logger = logging.getLogger(__name__)

_READ, _WRITE = 0, 1  # queue priorities: reads first; writes and deletes in FIFO order
# Blocks waiting to be written hold their bytes in memory; past this many bytes a demotion
# to disk is refused (the block is dropped) rather than letting a slow disk eat the RAM.
MAX_PENDING_WRITE_BYTES = 1 << 30


@dataclass(eq=False)
class DiskOp:
    """One file operation; for reads also the handle a promotion polls."""

    kind: str  # "read", "write", "delete" or "barrier"
    entry: TierEntry | None
    path: Path | None
    header: BlockFileHeader | None = None
    # write: the block's bytes (L, 2, bs, H_kv, D); read: filled in when done (None: failed).
    payload: torch.Tensor | None = None
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    def done(self) -> bool:
        return self.finished.is_set()


class DiskTier:
    """Block files of one model fingerprint under a (possibly shared) directory."""

    def __init__(
        self,
        root: str | Path,
        capacity_bytes: int,
        fingerprint: str,
        block_shape: tuple[int, ...],
        dtype: torch.dtype,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        self.block_shape = block_shape
        self.dtype = dtype
        self.block_nbytes = int(torch.Size(block_shape).numel()) * torch.tensor([], dtype=dtype).element_size()
        self.budget = DiskBudget(self.root, capacity_bytes)
        self.index = TierIndex()
        self._wall = wall_clock
        # Bytes of this engine's files (header included), per block, for metrics.
        self._sizes: dict[BlockHash, int] = {}
        self._writing: dict[BlockHash, DiskOp] = {}
        # IO thread: bytes of deleted files not yet given back to the budget.
        self._released = 0
        self._ops: queue.PriorityQueue[tuple[int, int, DiskOp | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._results: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        # Set whenever a read finishes, so an idle engine can sleep until then.
        self.wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvferry-disk-kv", daemon=True)
        self._thread.start()

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def backlogged(self) -> bool:
        """Too many writes are still queued: take no more demotions for now."""
        return len(self._writing) * self.block_nbytes >= MAX_PENDING_WRITE_BYTES

    # ------------------------------------------------------------- engine thread
    def load(self, now: float, lifetimes: TierLifetimes) -> list[TierEntry]:
        """Adopt the valid, unexpired block files already on disk; delete the rest."""
        adopted = []
        wall_now = self._wall()
        for path in sorted(self.dir.glob("*/*.kvb")):
            try:
                header = read_header(path)
                if (header.fingerprint != self.fingerprint or header.block_hash != hash_of_path(path)
                        or header.payload_nbytes != self.block_nbytes):
                    raise BlockFileError(f"{path.name} does not match this engine")
            except BlockFileError as e:
                logger.warning("disk KV tier: removing %s: %s", path, e)
                self._unlink_now(path)
                continue
            last_used_at = now - max(wall_now - header.last_used_wall, 0.0)
            expires_at = lifetimes.expiry(Tier.DISK, last_used_at, header.ttl_s)
            if expires_at <= now or header.block_hash in self.index:
                self._unlink_now(path)
                continue
            entry = TierEntry(header.block_hash, header.parent_hash, header.token_ids, header.ttl_s,
                              last_used_at, expires_at)
            self.index.add(entry)
            self._sizes[entry.block_hash] = header.file_nbytes()
            adopted.append(entry)
        return adopted

    def put(self, entry: TierEntry, payload: torch.Tensor, now: float) -> None:
        """Index ``entry`` and queue its file write (``payload``: the block, on the CPU)."""
        header = BlockFileHeader(
            self.fingerprint, entry.block_hash, entry.parent_hash, entry.token_ids, entry.ttl_s,
            self._wall() - (now - entry.last_used_at), self.block_nbytes,
        )
        op = DiskOp("write", entry, block_path(self.dir, entry.block_hash), header, payload)
        self.index.add(entry)
        self._sizes[entry.block_hash] = header.file_nbytes()
        self._writing[entry.block_hash] = op
        self._submit(_WRITE, op)

    def take(self, entry: TierEntry) -> DiskOp:
        """Start reading ``entry`` for a promotion (it leaves the index and, once read, the disk)."""
        self._forget(entry)
        pending = self._writing.pop(entry.block_hash, None)
        if pending is not None:
            # Still in memory: no disk read; the write is cancelled (or its file deleted).
            pending.cancelled = True
            self._submit(_WRITE, DiskOp("delete", entry, pending.path))
            done = DiskOp("read", entry, pending.path, payload=pending.payload)
            done.finished.set()
            return done
        op = DiskOp("read", entry, block_path(self.dir, entry.block_hash))
        self._submit(_READ, op)
        return op

    def drop(self, entry: TierEntry) -> None:
        """``entry`` left the disk tier (expired, superseded, cleared): delete its file."""
        self._forget(entry)
        pending = self._writing.pop(entry.block_hash, None)
        if pending is not None:
            pending.cancelled = True
        self._submit(_WRITE, DiskOp("delete", entry, block_path(self.dir, entry.block_hash)))

    def poll(self) -> list[TierEntry]:
        """Entries this tier lost in the background (budget evictions, failed writes)."""
        lost = []
        while True:
            try:
                kind, item = self._results.get_nowait()
            except queue.Empty:
                return lost
            if kind == "written" or kind == "write_failed":
                op = item
                if self._writing.get(op.entry.block_hash) is op:
                    del self._writing[op.entry.block_hash]
                    if kind == "write_failed" and self.index.entries.get(op.entry.block_hash) is op.entry:
                        self._forget(op.entry)
                        lost.append(op.entry)
            else:  # "evicted": files the budget deleted, maybe some of ours
                for path in item:
                    h = hash_of_path(path)
                    entry = self.index.entries.get(h) if path.parent.parent == self.dir else None
                    if entry is not None and h not in self._writing:
                        self._forget(entry)
                        lost.append(entry)

    def forget_all(self) -> None:
        """Drop every entry and delete their files (the engine cleared its cache)."""
        for entry in list(self.index.entries.values()):
            self.drop(entry)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every write and delete queued so far is done; False on timeout."""
        op = DiskOp("barrier", None, None)
        self._submit(_WRITE, op)
        return op.finished.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued writes and deletes, then stop the IO thread."""
        if self._thread.is_alive():
            self._ops.put((_WRITE + 1, next(self._seq), None))
            self._thread.join(timeout_s)

    # ---------------------------------------------------------------- internals
    def _forget(self, entry: TierEntry) -> None:
        if self.index.entries.get(entry.block_hash) is entry:
            self.index.pop(entry.block_hash)
        self._sizes.pop(entry.block_hash, None)

    def _submit(self, priority: int, op: DiskOp) -> None:
        self._ops.put((priority, next(self._seq), op))

    def _unlink_now(self, path: Path, defer: bool = False) -> None:
        """Delete a block file and give its bytes back to the budget (``defer``: the IO
        thread batches the give-back, one locked update when its queue runs dry)."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        if defer:
            self._released += size  # counted as used a little longer: only ever conservative
        else:
            self.budget.release(size)

    def _flush_released(self) -> None:
        if self._released:
            self.budget.release(self._released)
            self._released = 0

    def _run(self) -> None:
        while True:
            _, _, op = self._ops.get()
            if op is None:
                return
            try:
                getattr(self, f"_do_{op.kind}")(op)
            except Exception:  # noqa: BLE001 - the IO thread must outlive any one file
                logger.exception("disk KV tier: %s of %s failed", op.kind, op.path)
                if op.kind == "write":
                    self._results.put(("write_failed", op))
            finally:
                op.finished.set()
                if op.kind == "read":
                    self.wake.set()
            if self._ops.empty():
                self._flush_released()

    def _do_write(self, op: DiskOp) -> None:
        if op.cancelled:
            return
        self._flush_released()  # the budget check below sees every deletion so far
        old = 0
        with self.budget.reserving(op.header.file_nbytes()) as evicted:
            if evicted:
                self._results.put(("evicted", evicted))
            old = op.path.stat().st_size if op.path.exists() else 0
            write_block_file(op.path, op.header, memoryview(op.payload.reshape(-1).view(torch.uint8).numpy()))
        if old:
            self.budget.release(old)  # replaced an older copy of the same block
        self._results.put(("written", op))

    def _do_read(self, op: DiskOp) -> None:
        try:
            header, raw = read_block_file(op.path, self.fingerprint, op.entry.block_hash, self.block_nbytes)
            if header.token_ids != op.entry.token_ids:
                raise BlockFileError(f"{op.path.name} holds other tokens")
        except BlockFileError as e:
            if op.path.exists():
                logger.warning("disk KV tier: removing %s: %s", op.path, e)
            self._unlink_now(op.path, defer=True)
            return  # payload stays None: a miss
        self._unlink_now(op.path, defer=True)
        op.payload = torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).view(self.block_shape)

    def _do_delete(self, op: DiskOp) -> None:
        self._unlink_now(op.path, defer=True)

    def _do_barrier(self, op: DiskOp) -> None:
        pass  # everything queued before it is done
