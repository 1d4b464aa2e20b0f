"""KV transport over gloo: between two real processes, and many transfers on one pair.

The cross-process tests spawn a sender with torch.multiprocessing. The stream tests run
both ends in one process (gloo ranks on threads) to stay fast: many transfers in flight,
claims in shuffled order, unclaimed buffers, a failure mid-stream, close, idle retirement.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.multiprocessing as tmp

from cluster.transport import (
    TransferError,
    TransportEndpoint,
    available_backends,
    make_transport,
    select_backend,
)
from cluster.transport import torch_dist_wire as wire
from cluster.transport.torch_dist import TorchDistTransport
from cluster.transport.torch_dist_wire import Graveyard

SHAPE = (2, 2, 3, 4, 2, 8)  # (num_layers, 2, n, block_size, H_kv, D)


def _payload(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g)


def _sender(endpoint: TransportEndpoint, transfer_ids: list[int], results: mp.Queue) -> None:
    """Prefill side: send one buffer per transfer id, report the group id each used."""
    torch.set_num_threads(1)
    t = make_transport("gloo", "prefill-0", connect_timeout_s=10, transfer_timeout_s=10)
    handles = [t.send(endpoint, tid, _payload(tid)) for tid in transfer_ids]
    for tid, h in zip(transfer_ids, handles):
        results.put((tid, h.result.group_id, h.result.shape, h.result.dtype))
    for h in handles:
        h.wait(10)
    results.put("done")
    # Stay up until the receiver has drained (gloo closes pairs with the process).
    time.sleep(1.0)
    t.close()


def test_gloo_transfer_between_processes_out_of_order() -> None:
    recv_side = make_transport("gloo", "decode-0", connect_timeout_s=10, transfer_timeout_s=10)
    endpoint = recv_side.listen()
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_sender, args=(endpoint, [7, 8, 9], q))
    proc.start()
    try:
        infos = [q.get(timeout=60) for _ in range(3)]
        # Receive in reverse order: tags keep concurrent transfers apart.
        for tid, group_id, shape, dtype in reversed(infos):
            buf = recv_side.recv(group_id, tid, shape, torch.float32, timeout_s=10)
            assert torch.equal(buf, _payload(tid)), f"transfer {tid} corrupted"
        assert q.get(timeout=30) == "done"
        # All three transfers shared one lazily formed pair group.
        assert len({g for _, g, _, _ in infos}) == 1
    finally:
        proc.join(timeout=30)
        recv_side.close()
    assert proc.exitcode == 0


def test_recv_times_out_when_sender_never_sends() -> None:
    recv_side = make_transport("gloo", "decode-1", connect_timeout_s=2, transfer_timeout_s=2)
    recv_side.listen()
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        recv_side.recv(1, 123, SHAPE, torch.float32, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    recv_side.close()


def _idle_joiner(endpoint: TransportEndpoint, results: mp.Queue) -> None:
    """Joins the pair, sends transfer 1, then dies without sending transfer 2."""
    t = make_transport("gloo", "prefill-x", connect_timeout_s=10, transfer_timeout_s=10)
    h = t.send(endpoint, 1, _payload(1))
    results.put(h.result.group_id)
    h.wait(10)
    time.sleep(0.5)
    # Exit abruptly: the receiver waits for transfer 2 on a dead peer.
    import os

    os._exit(0)


def test_recv_fails_fast_enough_when_peer_dies() -> None:
    recv_side = make_transport("gloo", "decode-2", connect_timeout_s=10, transfer_timeout_s=3)
    endpoint = recv_side.listen()
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_idle_joiner, args=(endpoint, q))
    proc.start()
    try:
        gid = q.get(timeout=60)
        assert torch.equal(recv_side.recv(gid, 1, SHAPE, torch.float32, timeout_s=10), _payload(1))
        proc.join(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            recv_side.recv(gid, 2, SHAPE, torch.float32, timeout_s=3)
        assert time.monotonic() - t0 < 10.0
    finally:
        proc.join(timeout=10)
        recv_side.close()


def test_send_to_unreachable_endpoint_raises_transfer_error() -> None:
    from tests.conftest import free_port

    sender = make_transport("gloo", "prefill-9", connect_timeout_s=1, transfer_timeout_s=1)
    dead = TransportEndpoint("gloo", "127.0.0.1", free_port(), "nobody")
    t0 = time.monotonic()
    with pytest.raises(TransferError):
        sender.send(dead, 1, _payload(0))
    assert time.monotonic() - t0 < 10.0


def test_backend_selection_offers_only_existing_backends() -> None:
    assert "gloo" in available_backends()
    assert select_backend("auto", "cpu") == "gloo"
    assert select_backend("gloo", "cpu") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            select_backend("nccl", "cuda:0")
        with pytest.raises(ValueError):
            select_backend("cuda_ipc", "cuda:0")
    assert "cuda_ipc" not in available_backends() or torch.cuda.is_available()
    with pytest.raises(ValueError):
        make_transport("carrier-pigeon", "x")


def _sender_with_unclaimed(endpoint: TransportEndpoint, results: mp.Queue, go: mp.Event) -> None:
    """Sends transfer 5 (the receiver never claims it), then transfer 7 once told to."""
    t = make_transport("gloo", "prefill-r", connect_timeout_s=10, transfer_timeout_s=10)
    t.send(endpoint, 5, _payload(5))  # handle dropped: the transport keeps the send alive
    results.put(1)
    assert go.wait(30)
    h = t.send(endpoint, 7, _payload(7))
    results.put(h.result.group_id)
    h.wait(10)
    time.sleep(0.5)
    t.close()


def test_claim_timeout_leaves_the_group_usable() -> None:
    """A claim for a transfer nobody sent fails alone: the stream on the pair goes on."""
    recv_side = make_transport("gloo", "decode-r", connect_timeout_s=10, transfer_timeout_s=10)
    endpoint = recv_side.listen()
    ctx = tmp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_sender_with_unclaimed, args=(endpoint, q, go))
    proc.start()
    try:
        assert q.get(timeout=60) == 1
        with pytest.raises(TransferError):  # the receiver waits for a transfer that never comes
            recv_side.recv(1, 6, SHAPE, torch.float32, timeout_s=1.0)
        go.set()
        group = q.get(timeout=30)
        assert group == 1
        assert torch.equal(recv_side.recv(group, 7, SHAPE, torch.float32, timeout_s=10), _payload(7))
    finally:
        proc.join(timeout=30)
        recv_side.close()
    assert proc.exitcode == 0


# ---------------------------------------------------------------- one pair, many transfers
# Sender and receiver in one process (two threads' worth of gloo ranks): seconds, not spawns.


def _varied(tid: int) -> torch.Tensor:
    """A payload whose shape and dtype depend on ``tid``: a mix-up cannot go unnoticed."""
    n = 1 + tid % 4
    t = torch.randn((2, 2, n, 4, 2, 8), generator=torch.Generator().manual_seed(tid))
    return t.half() if tid % 3 == 0 else t


def _local_pair(
    send_timeout_s: float = 5.0, **recv_kw: float
) -> tuple[TorchDistTransport, TorchDistTransport, TransportEndpoint]:
    kw = {"connect_timeout_s": 10.0, "transfer_timeout_s": 5.0, **recv_kw}
    receiver = TorchDistTransport("gloo", "decode-local", **kw)
    sender = TorchDistTransport("gloo", "prefill-local", connect_timeout_s=10.0, transfer_timeout_s=send_timeout_s)
    return sender, receiver, receiver.listen()


def _claim(receiver: TorchDistTransport, group: int, tid: int, timeout_s: float = 10.0) -> torch.Tensor:
    ref = _varied(tid)
    return receiver.recv(group, tid, tuple(ref.shape), ref.dtype, timeout_s=timeout_s)


def _wait_until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("matching", ["tagged", "in_order"])
def test_many_transfers_in_flight_on_one_pair_claimed_in_shuffled_order(
    matching: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends race from 4 threads; claims come in shuffled order, half before the data.

    ``in_order`` gives every transfer the same gloo tag, so gloo matches sends and
    receives purely in issue order — NCCL's semantics. Receives posted in claim order
    would then pair the wrong buffers (shapes and dtypes differ per transfer).
    """
    if matching == "in_order":
        monkeypatch.setattr(wire, "tag", lambda seq: 0)
    sender, receiver, endpoint = _local_pair()
    try:
        first = sender.send(endpoint, 0, _varied(0))
        group = first.result.group_id
        assert torch.equal(_claim(receiver, group, 0), _varied(0))
        tids = list(range(1, 33))
        order = tids[:]
        random.Random(7).shuffle(order)
        early, late = order[:16], order[16:]
        with ThreadPoolExecutor(len(early)) as claimers, ThreadPoolExecutor(4) as senders:
            # Claimants for half the transfers are already waiting when the sends start.
            early_claims = {tid: claimers.submit(_claim, receiver, group, tid) for tid in early}
            chunks = [tids[i::4] for i in range(4)]
            sent = senders.map(lambda chunk: [(tid, sender.send(endpoint, tid, _varied(tid))) for tid in chunk], chunks)
            handles = dict(pair for chunk in sent for pair in chunk)
            for h in handles.values():
                h.wait(10)
            got = {tid: f.result(timeout=20) for tid, f in early_claims.items()}
        # The rest are claimed after they arrived, one at a time, in shuffled order.
        for tid in late:
            got[tid] = _claim(receiver, group, tid)
        for tid in tids:
            ref = _varied(tid)
            assert got[tid].dtype == ref.dtype and torch.equal(got[tid], ref), f"transfer {tid} corrupted"
        # One lazily formed group carried everything; nothing is left behind.
        assert {h.result.group_id for h in handles.values()} == {group}
        assert receiver._receiver is not None and not receiver._receiver.arrived
    finally:
        sender.close()
        receiver.close()


def test_claim_with_the_wrong_shape_fails_alone() -> None:
    sender, receiver, endpoint = _local_pair()
    try:
        group = sender.send(endpoint, 1, _varied(1)).result.group_id
        with pytest.raises(TransferError, match="expected"):
            receiver.recv(group, 1, (1, 2, 3), torch.float32, timeout_s=5)
        h = sender.send(endpoint, 2, _varied(2))
        assert h.result.group_id == group  # the stream is still in step
        assert torch.equal(_claim(receiver, group, 2), _varied(2))
    finally:
        sender.close()
        receiver.close()


def test_unclaimed_buffers_are_dropped() -> None:
    sender, receiver, endpoint = _local_pair(unclaimed_ttl_s=0.3)
    rx = receiver._receiver
    assert rx is not None
    try:
        handles = [sender.send(endpoint, tid, _varied(tid)) for tid in (1, 2, 3)]
        group = handles[0].result.group_id
        for h in handles:
            h.wait(10)
        assert torch.equal(_claim(receiver, group, 1), _varied(1))
        # A claimant that gave up before its buffer came: the buffer is dropped on arrival.
        with pytest.raises(TransferError):
            _claim(receiver, group, 4, timeout_s=0.2)
        sender.send(endpoint, 4, _varied(4)).wait(10)
        # 2 and 3 were never claimed: gone after the TTL, without anyone asking.
        assert _wait_until(lambda: rx.num_dropped_unclaimed == 3 and not rx.arrived, 5.0)
        assert not rx.given_up or _wait_until(lambda: not rx.given_up, 2.0)
        with pytest.raises(TransferError):
            _claim(receiver, group, 2, timeout_s=0.2)
        # The pair itself is fine.
        h = sender.send(endpoint, 5, _varied(5))
        assert h.result.group_id == group and torch.equal(_claim(receiver, group, 5), _varied(5))
    finally:
        sender.close()
        receiver.close()


class _BrokenGroup:
    """Stands in for a receiving process group whose connection just broke."""

    def recv(self, tensors: list, src: int, tag: int) -> None:
        raise RuntimeError("injected: connection reset by peer")


def test_failure_mid_stream_fails_the_waiters_and_the_next_send_repairs() -> None:
    # gloo cannot interrupt a posted send: the sender's handles fail at its own timeout.
    sender, receiver, endpoint = _local_pair(send_timeout_s=1.0)
    rx = receiver._receiver
    assert rx is not None
    try:
        handles = [sender.send(endpoint, tid, _varied(tid)) for tid in (1, 2)]
        group = handles[0].result.group_id
        for h in handles:
            h.wait(10)
        rx.inboxes[group].group = _BrokenGroup()  # type: ignore[assignment]
        with ThreadPoolExecutor(2) as pool:
            waiters = [pool.submit(_claim, receiver, group, tid, 30.0) for tid in (3, 4)]
            time.sleep(0.1)
            t0 = time.monotonic()
            doomed = [sender.send(endpoint, tid, _varied(tid)) for tid in (3, 4)]
            for w in waiters:
                with pytest.raises(TransferError, match="failed"):
                    w.result(timeout=10)
            # Woken by the failure, not by their own 30 s timeout.
            assert time.monotonic() - t0 < 5.0
        # Buffers that arrived intact before the failure are still handed out.
        assert torch.equal(_claim(receiver, group, 2), _varied(2))
        with pytest.raises(TransferError):  # a dead group fails at once
            _claim(receiver, group, 9, timeout_s=30)
        assert doomed[0].result.group_id == group
        for h in doomed:
            if h.result.group_id == group:
                with pytest.raises(TransferError):
                    h.wait(10)
            else:  # the sender saw the failed key in time and re-paired for this one
                h.wait(10)
        # Their buffers are parked until the backend is done with them, not forever.
        assert 1 <= len(sender._graveyard) <= sender._graveyard.max_entries
        # The next send sees the failed key and pairs again.
        h = sender.send(endpoint, 5, _varied(5))
        assert h.result.group_id == group + 1
        assert torch.equal(_claim(receiver, h.result.group_id, 5), _varied(5))
        h.wait(10)
        assert group not in rx.inboxes and len(rx.inboxes) == 1
    finally:
        sender.close()
        receiver.close()


def test_close_stops_the_threads_and_wakes_waiters_promptly() -> None:
    sender, receiver, endpoint = _local_pair()
    rx = receiver._receiver
    assert rx is not None
    h = sender.send(endpoint, 1, _varied(1))
    group = h.result.group_id
    assert torch.equal(_claim(receiver, group, 1), _varied(1))
    h.wait(10)
    assert any(t.name.startswith("kv-pump") for t in rx.threads())
    with ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(_claim, receiver, group, 2, 30.0)
        time.sleep(0.1)
        t0 = time.monotonic()
        receiver.close()
        with pytest.raises(TransferError):
            waiter.result(timeout=5)
        sender.close()
        assert time.monotonic() - t0 < 2.0
    assert rx.threads() == []
    assert not any(t.name.startswith("kv-send") and t.is_alive() for t in threading.enumerate())
    with pytest.raises(TransferError):
        receiver.recv(group, 3, SHAPE, torch.float32, timeout_s=1)


def test_idle_groups_are_retired_on_both_sides_and_pairing_resumes() -> None:
    receiver = TorchDistTransport("gloo", "decode-idle", connect_timeout_s=10, transfer_timeout_s=5, idle_group_s=0.3)
    sender = TorchDistTransport("gloo", "prefill-idle", connect_timeout_s=10, transfer_timeout_s=5, idle_group_s=30)
    endpoint = receiver.listen()
    rx = receiver._receiver
    assert rx is not None
    try:
        h = sender.send(endpoint, 1, _varied(1))
        group = h.result.group_id
        assert torch.equal(_claim(receiver, group, 1), _varied(1))
        # The receiver drops the quiet group (a vanished peer would look the same).
        assert _wait_until(lambda: not rx.inboxes and not rx.threads()[1:], 5.0)
        h2 = sender.send(endpoint, 2, _varied(2))
        assert h2.result.group_id == group + 1
        assert torch.equal(_claim(receiver, h2.result.group_id, 2), _varied(2))
    finally:
        sender.close()
        receiver.close()


class _FakeWork:
    def __init__(self, done: bool) -> None:
        self.done = done

    def is_completed(self) -> bool:
        return self.done


def test_graveyard_stays_bounded() -> None:
    yard = Graveyard(max_age_s=5.0, max_entries=8)
    works = [_FakeWork(False) for _ in range(100)]
    for w in works:
        yard.bury(w, torch.zeros(4))  # type: ignore[arg-type]
    assert len(yard) == 8
    for w in works:
        w.done = True
    yard.bury(_FakeWork(False), torch.zeros(4))  # type: ignore[arg-type]
    assert len(yard) == 1  # completed works no longer pin their buffers
    yard.prune(now=time.monotonic() + 10.0)
    assert len(yard) == 0  # and nothing outlives the age bound
