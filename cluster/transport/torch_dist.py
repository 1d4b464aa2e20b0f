"""torch.distributed KV transport: a 2-rank process group per (sender, receiver) pair.

Why not ``init_process_group``: replicas come and go, and one replica pairs with many
peers, so there is no fixed world. Instead every receiver (decode replica) owns a
``TCPStore`` and an *acceptor* thread. A sender (prefill replica) that has no group with
that receiver yet registers a join under a fresh number ``n`` in the receiver's store and
both sides build ``ProcessGroupGloo`` (or NCCL) with rank 0 = sender, rank 1 = receiver on
a store prefix private to ``n``. The group lives until a transfer on it fails; then both
sides drop it and the next send joins a new one.

Transfers are tagged with the receiver's ``transfer_id`` so concurrent transfers on one
pair never mix (gloo matches send/recv by tag). Every wait has a timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster.transport.base import KVTransport, SendHandle, SendResult, TransferError, TransportEndpoint

logger = logging.getLogger(__name__)

_JOIN_COUNTER = "kvferry/joins"
_TAG_MOD = 1 << 30  # gloo tags are C ints
_ACCEPT_POLL_S = 0.02


def _join_key(n: int) -> str:
    return f"kvferry/join/{n}"


def _failed_key(n: int) -> str:
    # Set by the receiver when a transfer on group n failed: the sender must re-pair.
    return f"kvferry/failed/{n}"


def _td(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)


def _make_group(backend: str, store: dist.Store, rank: int, timeout_s: float) -> dist.ProcessGroup:
    """A 2-rank group on ``store`` (already prefixed for this pair)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, _td(timeout_s))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise ValueError(f"torch.distributed transport does not do backend {backend!r}")


@dataclass
class _Pair:
    """Sender side: one group with one receiver."""

    group_id: int
    group: dist.ProcessGroup
    store: dist.Store
    # NCCL ignores tags and matches sends to receives in issue order; the receiver posts
    # receives in whatever order replies reach it, so an NCCL pair carries one transfer at
    # a time (held from send until delivered). gloo matches by tag and needs no lock.
    in_flight: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))


class _TorchSendHandle(SendHandle):
    def __init__(
        self,
        owner: TorchDistTransport,
        key: tuple,
        work: dist.Work,
        buffer: torch.Tensor,
        result: SendResult,
        release: threading.Semaphore | None = None,
    ) -> None:
        self._owner = owner
        self._key = key
        self._work = work
        # The buffer must outlive the send: the backend reads it asynchronously.
        self._buffer = buffer
        self.result = result
        self._release = release

    def wait(self, timeout_s: float) -> None:
        try:
            self._work.wait(_td(timeout_s))
        except Exception as e:  # noqa: BLE001 - any backend failure is a transfer failure
            self._owner._drop_pair(self._key, self._work, self._buffer)
            raise TransferError(f"send on group {self.result.group_id} failed: {e}") from e
        finally:
            if self._release is not None:
                self._release.release()
                self._release = None


@dataclass
class _Acceptor:
    """Receiver side: the store, the acceptor thread and the groups it built."""

    store: dist.TCPStore
    endpoint: TransportEndpoint
    groups: dict[int, dist.ProcessGroup] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None


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
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        self.backend = backend
        self.replica_id = replica_id
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        # gloo ships CPU tensors; nccl ships from/to the replica's GPU.
        self.device = torch.device("cpu" if backend == "gloo" else device)
        self._lock = threading.Lock()
        self._join_lock = threading.Lock()
        self._pairs: dict[tuple, _Pair] = {}
        self._acceptor: _Acceptor | None = None
        self._closed = threading.Event()
        # Works that failed are parked here with their buffers: the backend may still touch them.
        self._graveyard: list[tuple[dist.Work, torch.Tensor]] = []

    # ------------------------------------------------------------------ receiver

    def listen(self) -> TransportEndpoint:
        with self._lock:
            if self._acceptor is not None:
                return self._acceptor.endpoint
            store = dist.TCPStore(
                self.host, 0, is_master=True, timeout=_td(self.connect_timeout_s), wait_for_workers=False
            )
            endpoint = TransportEndpoint(self.backend, self.host, int(store.port), self.replica_id)
            acc = _Acceptor(store=store, endpoint=endpoint)
            acc.thread = threading.Thread(target=self._accept_loop, args=(acc,), name="kv-acceptor", daemon=True)
            self._acceptor = acc
            acc.thread.start()
            return endpoint

    def _accept_loop(self, acc: _Acceptor) -> None:
        n = 1
        while not self._closed.is_set():
            # Poll with check(): a timed-out store.wait() logs a c10d warning every time.
            try:
                joined = acc.store.check([_join_key(n)])
            except Exception:  # noqa: BLE001 - store torn down
                return
            if not joined:
                self._closed.wait(_ACCEPT_POLL_S)
                continue
            peer = acc.store.get(_join_key(n)).decode()
            try:
                group = _make_group(
                    self.backend, dist.PrefixStore(f"kvferry/pg/{n}/", acc.store), 1, self.transfer_timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a broken join must not stop the acceptor
                logger.warning("pair group %d with %s failed to form: %s", n, peer, e)
                with acc.cond:
                    acc.failed.add(n)
                    acc.cond.notify_all()
            else:
                logger.info("pair group %d formed with %s", n, peer)
                with acc.cond:
                    acc.groups[n] = group
                    acc.cond.notify_all()
            n += 1

    def recv(
        self, group_id: int, transfer_id: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        acc = self._acceptor
        if acc is None:
            raise RuntimeError("recv before listen()")
        with acc.cond:
            ok = acc.cond.wait_for(
                lambda: group_id in acc.groups or group_id in acc.failed or self._closed.is_set(), timeout_s
            )
            group = acc.groups.get(group_id)
        if not ok or group is None:
            raise TransferError(f"pair group {group_id} not available within {timeout_s}s")
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = group.recv([buf], 0, transfer_id % _TAG_MOD)
            work.wait(_td(timeout_s))
        except Exception as e:  # noqa: BLE001 - timeout, peer gone, reset: all are failures
            # A failed group is never trusted again; tell the sender so it re-pairs at once
            # instead of finding out through its own send timeout.
            with acc.cond:
                acc.groups.pop(group_id, None)
                acc.failed.add(group_id)
            self._graveyard.append((locals().get("work"), buf))  # type: ignore[arg-type]
            try:
                acc.store.set(_failed_key(group_id), "1")
            except Exception:  # noqa: BLE001 - best effort
                pass
            raise TransferError(f"recv of transfer {transfer_id} on group {group_id} failed: {e}") from e
        return buf

    # ------------------------------------------------------------------ sender

    def _pair(self, endpoint: TransportEndpoint) -> tuple[tuple, _Pair]:
        key = (endpoint.host, endpoint.port, endpoint.owner_id)
        with self._lock:
            pair = self._pairs.get(key)
        if pair is not None and self._receiver_failed(pair):
            self._drop_pair(key, None, None)
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
            return bool(pair.store.check([_failed_key(pair.group_id)]))
        except Exception:  # noqa: BLE001 - receiver's store unreachable: the pair is dead too
            return True

    def _join(self, key: tuple, endpoint: TransportEndpoint) -> _Pair:
        try:
            store = dist.TCPStore(
                endpoint.host, endpoint.port, is_master=False, timeout=_td(self.connect_timeout_s)
            )
            n = int(store.add(_JOIN_COUNTER, 1))
            store.set(_join_key(n), self.replica_id)
            group = _make_group(
                self.backend, dist.PrefixStore(f"kvferry/pg/{n}/", store), 0, self.transfer_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - unreachable peer, rendezvous timeout
            raise TransferError(f"cannot pair with {endpoint.owner_id} at {endpoint.host}:{endpoint.port}: {e}") from e
        pair = _Pair(n, group, store)
        with self._lock:
            self._pairs[key] = pair
        return pair

    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        if endpoint.backend != self.backend:
            raise ValueError(f"endpoint speaks {endpoint.backend}, this transport {self.backend}")
        key, pair = self._pair(endpoint)
        buf = buffer.to(self.device).contiguous()
        release = None
        if self.backend == "nccl":
            if not pair.in_flight.acquire(timeout=self.transfer_timeout_s):
                raise TransferError(f"pair with {endpoint.owner_id} busy for {self.transfer_timeout_s}s")
            release = pair.in_flight
        try:
            work = pair.group.send([buf], 1, transfer_id % _TAG_MOD)
        except Exception as e:  # noqa: BLE001
            if release is not None:
                release.release()
            self._drop_pair(key, None, buf)
            raise TransferError(f"send to {endpoint.owner_id} failed: {e}") from e
        result = SendResult(pair.group_id, tuple(buf.shape), str(buf.dtype))
        return _TorchSendHandle(self, key, work, buf, result, release)

    def _drop_pair(self, key: tuple, work: dist.Work | None, buf: torch.Tensor | None) -> None:
        with self._lock:
            self._pairs.pop(key, None)
            if work is not None or buf is not None:
                self._graveyard.append((work, buf))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closed.set()
        acc = self._acceptor
        if acc is not None:
            with acc.cond:
                acc.cond.notify_all()
            if acc.thread is not None:
                acc.thread.join(timeout=2.0)
        with self._lock:
            self._pairs.clear()
        self._acceptor = None
