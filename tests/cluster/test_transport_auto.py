"""AutoTransport: the backend is chosen per receiver (cuda_ipc on a shared GPU, else primary).

The choice logic is checked with recording test doubles standing in for the inner
transports; the gloo path runs for real between two processes; the cuda_ipc path between
two processes on one GPU runs where a GPU exists.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.multiprocessing as tmp

from cluster.transport import (
    AutoTransport,
    KVTransport,
    SendHandle,
    SendResult,
    TransferError,
    TransportEndpoint,
    make_auto_transport,
)


class _Handle(SendHandle):
    def __init__(self, result: SendResult) -> None:
        self.result = result

    def wait(self, timeout_s: float) -> None:
        return None


class _Recording(KVTransport):
    """Test double: remembers what it was asked to do; listens on a made-up port."""

    def __init__(self, backend: str, port: int, fail_close: bool = False) -> None:
        self.backend = backend
        self.port = port
        self.sent: list[tuple[TransportEndpoint, int]] = []
        self.received: list[int] = []
        self.closed = False
        self.fail_close = fail_close

    def listen(self) -> TransportEndpoint:
        return TransportEndpoint(self.backend, "127.0.0.1", self.port, f"owner-{self.backend}")

    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        self.sent.append((endpoint, transfer_id))
        return _Handle(SendResult(3, tuple(buffer.shape), str(buffer.dtype)))

    def recv(self, group_id, transfer_id, shape, dtype, timeout_s) -> torch.Tensor:
        self.received.append(transfer_id)
        return torch.zeros(shape, dtype=dtype)

    def close(self) -> None:
        self.closed = True
        if self.fail_close:
            raise RuntimeError("boom")


def _pair(device_id: str, with_ipc: bool = True) -> tuple[AutoTransport, _Recording, _Recording]:
    nccl, ipc = _Recording("nccl", 1000), _Recording("cuda_ipc", 2000)
    return AutoTransport(nccl, ipc if with_ipc else None, device_id), nccl, ipc


def test_receiver_endpoint_lists_every_backend_and_its_gpu() -> None:
    receiver, _, _ = _pair("gpu-A")
    ep = receiver.listen()
    assert (ep.backend, ep.port, ep.device_id) == ("nccl", 1000, "gpu-A")
    assert [(a.backend, a.port) for a in ep.alternatives] == [("cuda_ipc", 2000)]
    # The endpoint crosses Ray as a pickle and is rebuilt from its fields by the prefill side.
    again = TransportEndpoint(**pickle.loads(pickle.dumps(ep)).__dict__)
    assert again == ep


def test_same_gpu_uses_cuda_ipc_and_says_so() -> None:
    receiver, _, _ = _pair("gpu-A")
    sender, s_nccl, s_ipc = _pair("gpu-A")
    handle = sender.send(receiver.listen(), 7, torch.zeros(2, 3))
    assert [(e.backend, e.port, tid) for e, tid in s_ipc.sent] == [("cuda_ipc", 2000, 7)]
    assert s_nccl.sent == []
    assert handle.result.backend == "cuda_ipc"


def test_other_gpu_uses_the_primary_backend() -> None:
    receiver, _, _ = _pair("gpu-A")
    sender, s_nccl, s_ipc = _pair("gpu-B")
    handle = sender.send(receiver.listen(), 8, torch.zeros(1))
    assert [(e.backend, e.port) for e, _ in s_nccl.sent] == [("nccl", 1000)]
    assert s_ipc.sent == [] and handle.result.backend == "nccl"


def test_no_device_identity_never_uses_ipc() -> None:
    # Without a GPU UUID two replicas cannot prove they share a card: IPC stays off.
    sender, s_nccl, s_ipc = _pair("")
    assert sender.ipc is None
    receiver, _, _ = _pair("")
    sender.send(receiver.listen(), 1, torch.zeros(1))
    assert len(s_nccl.sent) == 1 and s_ipc.sent == []


def test_no_common_backend_is_a_transfer_error() -> None:
    sender = AutoTransport(_Recording("gloo", 1))
    receiver, _, _ = _pair("gpu-A")
    with pytest.raises(TransferError, match="no common KV transport"):
        sender.send(receiver.listen(), 1, torch.zeros(1))


def test_explicit_cuda_ipc_primary_is_used_for_every_peer() -> None:
    sender = AutoTransport(_Recording("cuda_ipc", 5))
    receiver = AutoTransport(_Recording("cuda_ipc", 6))
    handle = sender.send(receiver.listen(), 4, torch.zeros(1))
    assert handle.result.backend == "cuda_ipc"


def test_recv_dispatches_on_the_backend_the_sender_used() -> None:
    receiver, nccl, ipc = _pair("gpu-A")
    receiver.recv(1, 10, (2,), torch.float32, 1.0, "cuda_ipc")
    receiver.recv(1, 11, (2,), torch.float32, 1.0, "nccl")
    receiver.recv(1, 12, (2,), torch.float32, 1.0)  # older senders report no backend
    assert ipc.received == [10] and nccl.received == [11, 12]
    with pytest.raises(TransferError, match="gloo"):
        receiver.recv(1, 13, (2,), torch.float32, 1.0, "gloo")


def test_close_closes_every_inner_transport_even_if_one_fails() -> None:
    nccl, ipc = _Recording("nccl", 1, fail_close=True), _Recording("cuda_ipc", 2)
    AutoTransport(nccl, ipc, "gpu-A").close()
    assert nccl.closed and ipc.closed


def test_cpu_replica_gets_gloo_only() -> None:
    t = make_auto_transport("auto", "r0", device="cpu")
    try:
        assert t.primary.backend == "gloo" and t.ipc is None and t.device_id == ""
        ep = t.listen()
        assert ep.backend == "gloo" and ep.alternatives == () and ep.device_id == ""
    finally:
        t.close()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            make_auto_transport("cuda_ipc", "r0", device="cuda")


def _gloo_sender(endpoint: TransportEndpoint, q) -> None:
    torch.set_num_threads(1)
    t = make_auto_transport("auto", "prefill-auto", device="cpu", connect_timeout_s=10, transfer_timeout_s=10)
    h = t.send(endpoint, 42, torch.arange(24, dtype=torch.float32).view(2, 3, 4))
    q.put(dataclasses.astuple(h.result))
    h.wait(10)
    q.get(timeout=30)  # stay up until the receiver has its copy
    t.close()


def test_gloo_transfer_through_auto_transport_between_processes() -> None:
    receiver = make_auto_transport("auto", "decode-auto", device="cpu", connect_timeout_s=10, transfer_timeout_s=10)
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_gloo_sender, args=(receiver.listen(), q))
    proc.start()
    try:
        group_id, shape, dtype, backend = q.get(timeout=60)
        assert backend == "gloo"
        buf = receiver.recv(group_id, 42, shape, torch.float32, 10.0, backend)
        assert torch.equal(buf, torch.arange(24, dtype=torch.float32).view(2, 3, 4))
        q.put("got it")
    finally:
        proc.join(timeout=30)
        receiver.close()
    assert proc.exitcode == 0


def _ipc_sender(endpoint: TransportEndpoint, q) -> None:
    t = make_auto_transport("auto", "prefill-gpu", device="cuda", connect_timeout_s=20, transfer_timeout_s=20)
    buf = torch.arange(4096, device="cuda", dtype=torch.bfloat16).view(4, 1024)
    h = t.send(endpoint, 9, buf)
    q.put(dataclasses.astuple(h.result))
    h.wait(30)
    t.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_processes_on_one_gpu_pick_cuda_ipc() -> None:
    receiver = make_auto_transport("auto", "decode-gpu", device="cuda", connect_timeout_s=20, transfer_timeout_s=20)
    assert receiver.ipc is not None, "a GPU replica must offer cuda_ipc beside nccl"
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_ipc_sender, args=(receiver.listen(), q))
    proc.start()
    try:
        group_id, shape, dtype, backend = q.get(timeout=120)
        assert backend == "cuda_ipc"
        buf = receiver.recv(group_id, 9, shape, torch.bfloat16, 30.0, backend)
        assert buf.is_cuda
        assert torch.equal(buf.cpu(), torch.arange(4096, dtype=torch.bfloat16).view(4, 1024))
    finally:
        proc.join(timeout=60)
        receiver.close()
    assert proc.exitcode == 0
