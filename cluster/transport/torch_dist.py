"""torch.distributed KV transport: a 2-rank process group per (sender, receiver) pair.

Why not ``init_process_group``: replicas come and go, and one replica pairs with many
peers, so there is no fixed world. Instead every receiver (decode replica) owns a
``TCPStore`` and an *acceptor* thread. A sender (prefill replica) that has no group with
that receiver yet registers a join under a fresh number ``n`` in the receiver's store and
both sides build ``ProcessGroupGloo`` (or NCCL) with rank 0 = sender, rank 1 = receiver on
a store prefix private to ``n``. The group lives until a transfer on it fails; then both
sides drop it (the failed key in the store tells the other side) and the next send joins
a new one.

Ordering: NCCL ignores tags and matches a pair's sends and receives in issue order, but
the decode side claims transfers in whatever order prefill replies reach it. So a pair
carries a stream: under a per-pair lock the sender takes the next sequence number,
publishes the transfer's metadata (transfer id, shape, dtype) in the receiver's store
under a key private to that group and number, and posts the send — sends are issued in
sequence order. On the receiver one pump thread per group reads the metadata in the same
order and posts the receives (``torch_dist_recv``); ``recv`` just claims the finished
buffer by transfer id. Any number of transfers can be in flight on one pair, for gloo
and NCCL alike (gloo is tagged with the sequence number too, and runs the same pump).
On the sending side a *reaper* thread per pair waits for the posted sends in order and
completes their handles; its first failure fails the pair. Every wait has a timeout;
key names and the metadata format live in ``torch_dist_wire``.
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
from cluster.transport.base import (
    KVTransport,
    SendHandle,
    SendResult,
    TransferError,
    TransportEndpoint,
)
from cluster.transport.torch_dist_recv import Receiver

logger = logging.getLogger(__name__)

# A quiet receiving group is retired after this long (its peer most likely died without
# a word); a live sender sees the failed key on its next send and re-pairs.
IDLE_GROUP_S = 600.0


@dataclass(eq=False)
class _Sent:
    """One posted send, waited for (in sequence order) by its pair's reaper."""

    work: dist.Work | None
    buf: torch.Tensor | None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


@dataclass(eq=False)
class _Pair:
    """Sender side: one group with one receiver and the stream of transfers on it."""

    group_id: int
    group: dist.ProcessGroup
    store: dist.Store
    # Held from taking a sequence number until the send is queued: sends leave in order.
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_seq: int = 0
    dead: bool = False
    error: str | None = None
    last_active: float = field(default_factory=time.monotonic)
    # Posted sends not yet complete, oldest first. They are kept here, not only in their
    # handles: a gloo send whose Work is dropped before the receive is posted is silently
    # cancelled, and a hole in the stream would stall every transfer behind it.
    outbox: deque[_Sent] = field(default_factory=deque)
    cv: threading.Condition = field(default_factory=threading.Condition)
    reaper: threading.Thread | None = None


class _TorchSendHandle(SendHandle):
    def __init__(self, sent: _Sent, result: SendResult) -> None:
        self._sent = sent
        self.result = result

    def wait(self, timeout_s: float) -> None:
        # The pair's reaper does the backend wait (and fails the pair if it fails).
        if not self._sent.done.wait(timeout_s):
            raise TransferError(f"send on group {self.result.group_id} not delivered within {timeout_s}s")
        if self._sent.error is not None:
            raise TransferError(f"send on group {self.result.group_id} failed: {self._sent.error}")


class TorchDistTransport(KVTransport):
    """gloo (CPU) and nccl (GPU) share this code path; only the group type and device differ."""

    def __init__(
        self,
        backend: str,
        replica_id: str,
        host: str = "127.0.0.1",
        connect_timeout_s: float = 20.0,
        transfer_timeout_s: float = 20.0,
        device: str = "cpu",
        unclaimed_ttl_s: float | None = None,
        idle_group_s: float = IDLE_GROUP_S,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        self.backend = backend
        self.replica_id = replica_id
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        # A buffer nobody claims within this long is dropped: its claimant gave up (it
        # claims right after the prefill reply, so a transfer timeout is ample).
        self.unclaimed_ttl_s = transfer_timeout_s if unclaimed_ttl_s is None else unclaimed_ttl_s
        self.idle_group_s = idle_group_s
        # gloo ships CPU tensors; nccl ships from/to the replica's GPU.
        self.device = torch.device("cpu" if backend == "gloo" else device)
        self._lock = threading.Lock()
        self._join_lock = threading.Lock()
        self._pairs: dict[tuple, _Pair] = {}
        self._receiver: Receiver | None = None
        self._closed = threading.Event()
        # Failed works parked with their buffers (the backend may still touch them); past
        # twice the op timeout the backend has given up on them, so they can go.
        self._graveyard = wire.Graveyard(max_age_s=2 * max(transfer_timeout_s, connect_timeout_s))

    # ------------------------------------------------------------------ receiver

    def listen(self) -> TransportEndpoint:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("transport closed")
            if self._receiver is None:
                self._receiver = Receiver(
                    self.backend, self.replica_id, self.host, self.device, self.connect_timeout_s,
                    self.transfer_timeout_s, self.unclaimed_ttl_s, self.idle_group_s, self._graveyard,
                )
            return self._receiver.endpoint

    def recv(
        self, group_id: int, transfer_id: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        receiver = self._receiver
        if receiver is None:
            if self._closed.is_set():
                raise TransferError("transport closed")
            raise RuntimeError("recv before listen()")
        return receiver.claim(group_id, transfer_id, tuple(shape), dtype, timeout_s)

    # ------------------------------------------------------------------ sender

    def _pair(self, endpoint: TransportEndpoint) -> tuple[tuple, _Pair]:
        key = (endpoint.host, endpoint.port, endpoint.owner_id)
        with self._lock:
            pair = self._pairs.get(key)
        if pair is not None and self._receiver_failed(pair):
            self._fail_pair(key, pair, "the receiver declared it failed", tell_receiver=False, log=False)
            pair = None
        if pair is not None:
            return key, pair
        # Joins are rare: one at a time, so two racing sends never build two groups.
        with self._join_lock:
            with self._lock:
                pair = self._pairs.get(key)
            if pair is not None:
                return key, pair
            return key, self._join(key, endpoint)

    @staticmethod
    def _receiver_failed(pair: _Pair) -> bool:
        try:
            return bool(pair.store.check([wire.failed_key(pair.group_id)]))
        except Exception:  # noqa: BLE001 - receiver's store unreachable: the pair is dead too
            return True

    def _join(self, key: tuple, endpoint: TransportEndpoint) -> _Pair:
        try:
            store = dist.TCPStore(
                endpoint.host, endpoint.port, is_master=False, timeout=wire.td(self.connect_timeout_s)
            )
            n = int(store.add(wire.JOIN_COUNTER, 1))
            store.set(wire.join_key(n), self.replica_id)
            group = wire.make_group(
                self.backend, dist.PrefixStore(wire.group_prefix(n), store), 0, self.transfer_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - unreachable peer, rendezvous timeout
            raise TransferError(f"cannot pair with {endpoint.owner_id} at {endpoint.host}:{endpoint.port}: {e}") from e
        pair = _Pair(n, group, store)
        pair.reaper = threading.Thread(target=self._reap, args=(key, pair), name=f"kv-send-{n}", daemon=True)
        pair.reaper.start()
        with self._lock:
            self._pairs[key] = pair
        return pair

    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        if endpoint.backend != self.backend:
            raise ValueError(f"endpoint speaks {endpoint.backend}, this transport {self.backend}")
        if self._closed.is_set():
            raise TransferError("transport closed")
        buf = buffer.to(self.device).contiguous()
        meta = wire.TransferMeta(int(transfer_id), tuple(buf.shape), str(buf.dtype))
        # A pair found dead under its lock (another send's failure) is replaced once.
        for _ in range(2):
            key, pair = self._pair(endpoint)
            failure: Exception | None = None
            with pair.lock:
                if pair.dead:
                    continue
                seq = pair.next_seq
                try:
                    # Metadata first: the receiver's pump posts the receive for ``seq`` only
                    # once it can read it, and NCCL's first send blocks until it does.
                    pair.store.set(wire.meta_key(pair.group_id, seq), meta.encode())
                    work = pair.group.send([buf], 1, wire.tag(seq))
                except Exception as e:  # noqa: BLE001 - store or group broken: re-pair next time
                    failure = e
                else:
                    pair.next_seq = seq + 1
                    sent = _Sent(work, buf)
                    with pair.cv:
                        if pair.dead:  # failed meanwhile: the reaper is gone
                            sent.error = pair.error
                            sent.done.set()
                            self._graveyard.bury(work, buf)
                        else:
                            pair.outbox.append(sent)
                            pair.last_active = time.monotonic()
                            pair.cv.notify_all()
            if failure is not None:
                self._fail_pair(key, pair, f"{type(failure).__name__}: {failure}")
                raise TransferError(f"send to {endpoint.owner_id} failed: {failure}") from failure
            return _TorchSendHandle(sent, SendResult(pair.group_id, tuple(buf.shape), str(buf.dtype)))
        raise TransferError(f"pair with {endpoint.owner_id} kept failing")

    def _reap(self, key: tuple, pair: _Pair) -> None:
        """Wait for the pair's sends in order; the first failure fails the pair.

        A pair idle for ``idle_group_s`` is retired too (its receiver may be long gone), so
        neither side keeps a group, a thread and a store connection per departed peer.
        """
        while True:
            with pair.cv:
                while not pair.outbox and not pair.dead:
                    if time.monotonic() - pair.last_active > self.idle_group_s:
                        break
                    pair.cv.wait(1.0)
                if pair.dead:
                    return
                head = pair.outbox[0] if pair.outbox else None
            if head is None:
                self._fail_pair(key, pair, f"idle for {self.idle_group_s}s", log=False)
                return
            try:
                assert head.work is not None
                wire.await_work(head.work, self.backend, self.transfer_timeout_s)
            except Exception as e:  # noqa: BLE001 - timeout, peer gone, reset
                self._fail_pair(key, pair, f"{type(e).__name__}: {e}")
                return
            with pair.cv:
                if pair.outbox and pair.outbox[0] is head:
                    pair.outbox.popleft()
                if head.error is None:
                    head.done.set()

    def _fail_pair(
        self, key: tuple, pair: _Pair, reason: str, *, tell_receiver: bool = True, log: bool = True
    ) -> None:
        """Never use ``pair`` again: fail its queued sends, park their works, tell the receiver."""
        with self._lock:
            if self._pairs.get(key) is pair:  # a fresh pair for the same receiver stays
                del self._pairs[key]
        with pair.cv:
            first = not pair.dead
            pair.dead = True
            pair.error = pair.error or reason
            queued = list(pair.outbox)
            pair.outbox.clear()
            for sent in queued:
                sent.error = pair.error
                sent.done.set()
            pair.cv.notify_all()
        for sent in queued:
            # The backend may still read these buffers: keep them until it cannot.
            self._graveyard.bury(sent.work, sent.buf)
        if first and log:
            logger.warning("pair group %d failed on the sending side: %s", pair.group_id, reason)
        if first and tell_receiver:  # best effort: its pump times out on its own
            with contextlib.suppress(Exception):
                pair.store.set(wire.failed_key(pair.group_id), "1")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.close()
        with self._lock:
            pairs = list(self._pairs.items())
        for key, pair in pairs:
            # Tell the receiver, so its pump for this group stops now rather than when idle.
            self._fail_pair(key, pair, "transport closed", log=False)
        deadline = time.monotonic() + 2.0
        for _, pair in pairs:
            if pair.reaper is not None:
                pair.reaper.join(timeout=max(0.0, deadline - time.monotonic()))
        self._receiver = None
