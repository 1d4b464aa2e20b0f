"""KV transport over gloo between two real processes (torch.multiprocessing), incl. failures."""

from __future__ import annotations

import multiprocessing as mp
import time

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


def _sender_after_failure(endpoint: TransportEndpoint, results: mp.Queue, go: mp.Event) -> None:
    """Sends transfer 5 (the receiver will give up on it), then transfer 7 once told to."""
    t = make_transport("gloo", "prefill-r", connect_timeout_s=10, transfer_timeout_s=10)
    t.send(endpoint, 5, _payload(5))
    results.put(1)
    assert go.wait(30)
    h = t.send(endpoint, 7, _payload(7))  # must notice the failed group and re-pair
    results.put(h.result.group_id)
    h.wait(10)
    time.sleep(0.5)
    t.close()


def test_failed_group_is_replaced_on_the_next_send() -> None:
    recv_side = make_transport("gloo", "decode-r", connect_timeout_s=10, transfer_timeout_s=10)
    endpoint = recv_side.listen()
    ctx = tmp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_sender_after_failure, args=(endpoint, q, go))
    proc.start()
    try:
        assert q.get(timeout=60) == 1
        with pytest.raises(TransferError):  # the receiver waits for a transfer that never comes
            recv_side.recv(1, 6, SHAPE, torch.float32, timeout_s=1.0)
        go.set()
        new_group = q.get(timeout=30)
        assert new_group == 2
        assert torch.equal(recv_side.recv(new_group, 7, SHAPE, torch.float32, timeout_s=10), _payload(7))
    finally:
        proc.join(timeout=30)
        recv_side.close()
    assert proc.exitcode == 0
