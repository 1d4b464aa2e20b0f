"""Receiver side of the torch.distributed KV transport: acceptor, ordered pumps, claims.

NCCL ignores tags and matches a pair's sends to its receives in issue order, while the
decode replica claims transfers in whatever order prefill replies reach it. So nobody
waiting for a particular transfer ever posts a receive. Instead each pair group has one
*pump* thread that reads the transfer metadata the sender published (transfer id, shape,
dtype, one store key per sequence number) strictly in sequence order, allocates the
buffer and posts the receive in that same order — the order the sender issued its sends
in. Finished buffers land in ``arrived``, keyed by (group, transfer id), where ``claim``
callers pick them up. gloo runs the very same path (tagged by sequence number), so CI
exercises it.

Failures: a failed receive (or the sender's failed key) fails the whole group: waiters on
it are woken with an error, its pump stops, its process group is dropped and the failed
key tells the sender to re-pair. Buffers that already arrived stay claimable until the
unclaimed TTL; anything unclaimed after that is dropped, and a buffer whose claimant
already gave up is dropped on arrival. Every wait is bounded and every thread stops on
``close`` (a pump blocked on a posted receive stops when that bounded wait ends).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster.transport import torch_dist_wire as wire
from cluster.transport.base import TransferError, TransportEndpoint, dtype_from_str

logger = logging.getLogger(__name__)

# How often idle threads look at the store (a claim wakes its pump at once).
POLL_S = 0.02
# How often an idle pump checks whether the sender declared the group failed, and how
# often the acceptor sweeps unclaimed buffers.
CHECK_S = 0.25
# Receives a pump keeps posted ahead of the oldest unfinished one.
PUMP_WINDOW = 8
# Cap on leftover metadata keys removed from the store when a group dies.
_MAX_META_CLEANUP = 4096


@dataclass
class _Arrival:
    buf: torch.Tensor
    at: float  # time.monotonic() of arrival


@dataclass
class _Posted:
    seq: int
    meta: wire.TransferMeta
    buf: torch.Tensor
    work: dist.Work


@dataclass
class _Inbox:
    """One pair group on the receiving side, served by one pump thread."""

    group_id: int
    group: dist.ProcessGroup | None
    peer: str
    next_seq: int = 0
    # transfer id -> event set when its buffer arrives or the group fails.
    waiting: dict[int, threading.Event] = field(default_factory=dict)
    error: str | None = None
    last_active: float = field(default_factory=time.monotonic)
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Receiver:
    """Owns the rendezvous store, the acceptor thread and one pump per pair group."""

    def __init__(
        self,
        backend: str,
        replica_id: str,
        host: str,
        device: torch.device,
        connect_timeout_s: float,
        transfer_timeout_s: float,
        unclaimed_ttl_s: float,
        idle_group_s: float,
        graveyard: wire.Graveyard,
    ) -> None:
        self.backend = backend
        self.device = device
        self.transfer_timeout_s = transfer_timeout_s
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.idle_group_s = idle_group_s
        self.graveyard = graveyard
        self.store = dist.TCPStore(host, 0, is_master=True, timeout=wire.td(connect_timeout_s), wait_for_workers=False)
        self.endpoint = TransportEndpoint(backend, host, int(self.store.port), replica_id)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # signalled when a group forms or fails
        self.inboxes: dict[int, _Inbox] = {}
        # Groups below this number were processed: absent from inboxes means dead.
        self.next_group = 1
        self.arrived: dict[tuple[int, int], _Arrival] = {}
        # (group, transfer) whose claimant timed out before arrival: dropped on arrival.
        self.given_up: dict[tuple[int, int], float] = {}
        self.num_dropped_unclaimed = 0
        self._pumps: list[threading.Thread] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-acceptor", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ acceptor

    def _accept_loop(self) -> None:
        next_sweep = time.monotonic() + CHECK_S
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + CHECK_S
            n = self.next_group
            # Poll with check(): a timed-out store.wait() logs a c10d warning every time.
            try:
                joined = self.store.check([wire.join_key(n)])
                peer = self.store.get(wire.join_key(n)).decode() if joined else ""
            except Exception:  # noqa: BLE001 - store torn down
                return
            if not joined:
                self._closed.wait(POLL_S)
                continue
            try:
                group = wire.make_group(
                    self.backend, dist.PrefixStore(wire.group_prefix(n), self.store), 1, self.transfer_timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a broken join must not stop the acceptor
                logger.warning("pair group %d with %s failed to form: %s", n, peer, e)
                with self.cond:
                    self.next_group = n + 1
                    self.cond.notify_all()
                continue
            logger.info("pair group %d formed with %s", n, peer)
            inbox = _Inbox(n, group, peer)
            inbox.thread = threading.Thread(target=self._pump, args=(inbox,), name=f"kv-pump-{n}", daemon=True)
            with self.cond:
                self.inboxes[n] = inbox
                self.next_group = n + 1
                self._pumps = [t for t in self._pumps if t.is_alive()] + [inbox.thread]
                inbox.thread.start()  # under the lock: close() never joins an unstarted thread
                self.cond.notify_all()
            with contextlib.suppress(Exception):  # only tidiness
                self.store.delete_key(wire.join_key(n))

    def _sweep(self, now: float) -> None:
        """Drop buffers nobody claimed in time (the decode side recomputed instead)."""
        with self.lock:
            stale = [k for k, a in self.arrived.items() if now - a.at > self.unclaimed_ttl_s]
            for k in stale:
                del self.arrived[k]
            self.num_dropped_unclaimed += len(stale)
            for k in [k for k, t in self.given_up.items() if now - t > self.unclaimed_ttl_s]:
                del self.given_up[k]
        if stale:
            logger.info("dropped %d unclaimed KV buffers", len(stale))
        self.graveyard.prune(now)

    # ------------------------------------------------------------------ pump

    def _pump(self, inbox: _Inbox) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # NCCL ops from this thread use the replica's GPU
        posted: deque[_Posted] = deque()
        reason = "closed"
        next_check = time.monotonic() + CHECK_S
        try:
            while not self._closed.is_set() and inbox.error is None:
                # Post a receive for every published transfer, in sequence order.
                while len(posted) < PUMP_WINDOW and self._post_next(inbox, posted):
                    pass
                if posted:
                    head = posted[0]
                    wire.await_work(head.work, self.backend, self.transfer_timeout_s)
                    posted.popleft()
                    self._deliver(inbox, head)
                    continue
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + CHECK_S
                    if self.store.check([wire.failed_key(inbox.group_id)]):
                        reason = "the sender declared it failed"
                        break
                    with self.lock:
                        idle = not inbox.waiting and now - inbox.last_active > self.idle_group_s
                    if idle:  # most likely a peer that died quietly; a live one re-pairs
                        reason = f"idle for {self.idle_group_s}s"
                        break
                if inbox.wake.wait(POLL_S):
                    inbox.wake.clear()
        except Exception as e:  # noqa: BLE001 - timeout, peer gone, reset: the group is dead
            reason = f"{type(e).__name__}: {e}"
            logger.warning("pair group %d with %s failed: %s", inbox.group_id, inbox.peer, reason)
        else:
            logger.info("pair group %d with %s closed: %s", inbox.group_id, inbox.peer, inbox.error or reason)
        self._fail_group(inbox, reason, tell_sender=not self._closed.is_set())
        for p in posted:
            self.graveyard.bury(p.work, p.buf)
        if not self._closed.is_set():
            self._forget_metadata(inbox)
        inbox.group = None  # the process group goes with the last reference

    def _post_next(self, inbox: _Inbox, posted: deque[_Posted]) -> bool:
        key = wire.meta_key(inbox.group_id, inbox.next_seq)
        if not self.store.check([key]):
            return False
        meta = wire.TransferMeta.decode(self.store.get(key))
        self.store.delete_key(key)
        buf = torch.empty(meta.shape, dtype=dtype_from_str(meta.dtype), device=self.device)
        assert inbox.group is not None
        work = inbox.group.recv([buf], 0, wire.tag(inbox.next_seq))
        posted.append(_Posted(inbox.next_seq, meta, buf, work))
        inbox.next_seq += 1
        inbox.last_active = time.monotonic()
        return True

    def _deliver(self, inbox: _Inbox, p: _Posted) -> None:
        key = (inbox.group_id, p.meta.transfer_id)
        now = time.monotonic()
        with self.lock:
            inbox.last_active = now
            if self.given_up.pop(key, None) is not None:
                self.num_dropped_unclaimed += 1
                return
            self.arrived[key] = _Arrival(p.buf, now)
            ev = inbox.waiting.get(p.meta.transfer_id)
        if ev is not None:
            ev.set()

    def _fail_group(self, inbox: _Inbox, reason: str, tell_sender: bool) -> None:
        """Mark the group dead here (and for the sender), waking everyone waiting on it."""
        with self.cond:
            if inbox.error is None:
                inbox.error = reason
            if self.inboxes.get(inbox.group_id) is inbox:
                del self.inboxes[inbox.group_id]
            for ev in inbox.waiting.values():
                ev.set()
            inbox.wake.set()
            self.cond.notify_all()
        if tell_sender:  # best effort: the sender's own timeout still fires
            with contextlib.suppress(Exception):
                self.store.set(wire.failed_key(inbox.group_id), "1")

    def _forget_metadata(self, inbox: _Inbox) -> None:
        """Remove metadata the sender published on a group that will never read it."""
        with contextlib.suppress(Exception):  # only tidiness
            for seq in range(inbox.next_seq, inbox.next_seq + _MAX_META_CLEANUP):
                if not self.store.check([wire.meta_key(inbox.group_id, seq)]):
                    break
                self.store.delete_key(wire.meta_key(inbox.group_id, seq))

    # ------------------------------------------------------------------ claims

    def claim(
        self, group_id: int, transfer_id: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        """The buffer sent under ``transfer_id`` on ``group_id``, once the pump has it."""
        deadline = time.monotonic() + timeout_s
        key = (group_id, transfer_id)
        with self.cond:
            while True:
                arrival = self.arrived.pop(key, None)
                inbox = self.inboxes.get(group_id)
                if arrival is not None or inbox is not None:
                    break
                if self._closed.is_set():
                    raise TransferError("transport closed")
                if group_id < self.next_group:
                    raise TransferError(f"pair group {group_id} failed or is gone")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferError(f"pair group {group_id} not available within {timeout_s}s")
                self.cond.wait(remaining)
            if arrival is None:
                assert inbox is not None
                ev = inbox.waiting.setdefault(transfer_id, threading.Event())
        if arrival is None:
            inbox.wake.set()  # the metadata is most likely published already: look now
            ev.wait(max(0.0, deadline - time.monotonic()))
            with self.lock:
                if inbox.waiting.get(transfer_id) is ev:
                    del inbox.waiting[transfer_id]
                arrival = self.arrived.pop(key, None)
                if arrival is None:
                    if inbox.error is None:
                        self.given_up[key] = time.monotonic()
                    why = f"not delivered within {timeout_s}s"
                    if inbox.error is not None:
                        why = f"pair group {group_id} failed: {inbox.error}"
                    raise TransferError(f"recv of transfer {transfer_id}: {why}")
        buf = arrival.buf
        if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            raise TransferError(
                f"transfer {transfer_id} arrived as {tuple(buf.shape)} {buf.dtype}, expected {tuple(shape)} {dtype}"
            )
        return buf

    # ------------------------------------------------------------------ lifecycle

    def close(self, join_s: float = 2.0) -> None:
        """Stop the acceptor and every pump; wake and fail every waiter."""
        self._closed.set()
        with self.lock:
            inboxes = list(self.inboxes.values())
        for inbox in inboxes:
            self._fail_group(inbox, "transport closed", tell_sender=False)
        deadline = time.monotonic() + join_s
        with self.lock:
            threads = [self._thread, *self._pumps]
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.arrived.clear()
            self.given_up.clear()

    def threads(self) -> list[threading.Thread]:
        """The acceptor and pump threads still alive (for tests and debugging)."""
        with self.lock:
            return [t for t in [self._thread, *self._pumps] if t.is_alive()]
