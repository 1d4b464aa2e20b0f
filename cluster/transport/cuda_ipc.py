"""cuda_ipc KV transport: prefill and decode roles on one GPU, where NCCL refuses two ranks.

The sender exports its packed buffer as a CUDA IPC handle (``torch.multiprocessing``'s
``reduce_tensor``, which also carries an event so the receiver waits for the sender's
writes) and publishes it under ``transfer_id`` in the receiver's ``TCPStore``. The
receiver opens the handle, copies the buffer into its own memory (device-to-device, no
host round trip) and acknowledges; only then does the sender let go of the buffer.
Every wait has a timeout and every failure is a ``TransferError``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import pickle
import threading
import time

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from cluster.transport.base import KVTransport, SendHandle, SendResult, TransferError, TransportEndpoint

# One logical "group" per receiver: IPC needs no pair process group.
_GROUP_ID = 0
_POLL_S = 0.0005


def _buf_key(transfer_id: int) -> str:
    return f"kvferry/ipc/{transfer_id}/buf"


def _ack_key(transfer_id: int) -> str:
    return f"kvferry/ipc/{transfer_id}/ack"


class _IpcSendHandle(SendHandle):
    """Holds the exported buffer until the receiver acknowledges its copy."""

    def __init__(self, store: dist.TCPStore, transfer_id: int, buffer: torch.Tensor, result: SendResult) -> None:
        self._store = store
        self._transfer_id = transfer_id
        self._buffer: torch.Tensor | None = buffer  # must outlive the receiver's copy
        self.result = result

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ack = _ack_key(self._transfer_id)
        try:
            while not self._store.check([ack]):
                if time.monotonic() > deadline:
                    raise TransferError(f"cuda_ipc transfer {self._transfer_id} not acknowledged in {timeout_s}s")
                time.sleep(_POLL_S)
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - store gone: the receiver died
            raise TransferError(f"cuda_ipc transfer {self._transfer_id} failed: {e}") from e
        finally:
            self._buffer = None
        # Delivered. Tidying the key is best effort: the receiver may already have closed
        # its store (it owns it), which must not turn a delivered transfer into a failure.
        with contextlib.suppress(Exception):
            self._store.delete_key(ack)


class CudaIpcTransport(KVTransport):
    """KV transfer between processes sharing one GPU, by CUDA IPC handle."""

    backend = "cuda_ipc"

    def __init__(
        self, replica_id: str, *, device: str = "cuda", host: str = "127.0.0.1", connect_timeout_s: float = 20.0
    ) -> None:
        if not torch.cuda.is_available():
            raise ValueError("cuda_ipc transport needs a CUDA device")
        self.replica_id = replica_id
        self.device = torch.device(device)
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._store: dist.TCPStore | None = None
        self._endpoint: TransportEndpoint | None = None
        self._clients: dict[tuple[str, int], dist.TCPStore] = {}

    def listen(self) -> TransportEndpoint:
        with self._lock:
            if self._endpoint is None:
                self._store = dist.TCPStore(
                    self.host, 0, is_master=True, timeout=dt.timedelta(seconds=self.connect_timeout_s),
                    wait_for_workers=False,
                )
                self._endpoint = TransportEndpoint(self.backend, self.host, int(self._store.port), self.replica_id)
            return self._endpoint

    def _client(self, endpoint: TransportEndpoint) -> dist.TCPStore:
        key = (endpoint.host, endpoint.port)
        with self._lock:
            store = self._clients.get(key)
            if store is None:
                try:
                    store = dist.TCPStore(
                        endpoint.host, endpoint.port, is_master=False,
                        timeout=dt.timedelta(seconds=self.connect_timeout_s),
                    )
                except Exception as e:  # noqa: BLE001 - unreachable receiver
                    raise TransferError(f"cannot reach {endpoint.owner_id} at {endpoint.host}:{endpoint.port}: {e}") from e
                self._clients[key] = store
            return store

    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        if endpoint.backend != self.backend:
            raise ValueError(f"endpoint speaks {endpoint.backend}, this transport {self.backend}")
        if not buffer.is_cuda:
            raise ValueError("cuda_ipc sends CUDA tensors only")
        buf = buffer.contiguous()
        store = self._client(endpoint)
        _, args = reduce_tensor(buf)  # IPC handle + an event the receiver waits on
        try:
            store.set(_buf_key(transfer_id), pickle.dumps(args))
        except Exception as e:  # noqa: BLE001
            raise TransferError(f"cuda_ipc send {transfer_id} to {endpoint.owner_id} failed: {e}") from e
        return _IpcSendHandle(store, transfer_id, buf, SendResult(_GROUP_ID, tuple(buf.shape), str(buf.dtype)))

    def recv(
        self, group_id: int, transfer_id: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        store = self._store
        if store is None:
            raise RuntimeError("recv before listen()")
        key = _buf_key(transfer_id)
        try:
            store.wait([key], dt.timedelta(seconds=timeout_s))
            shared = rebuild_cuda_tensor(*pickle.loads(store.get(key)))
        except Exception as e:  # noqa: BLE001 - timeout or a broken handle
            raise TransferError(f"cuda_ipc recv of transfer {transfer_id} failed: {e}") from e
        if tuple(shared.shape) != tuple(shape) or shared.dtype != dtype:
            raise TransferError(
                f"cuda_ipc transfer {transfer_id}: got {tuple(shared.shape)} {shared.dtype}, expected {tuple(shape)} {dtype}"
            )
        out = shared.to(self.device, copy=True)
        torch.cuda.current_stream(self.device).synchronize()  # the copy is done before we ack
        del shared
        store.delete_key(key)
        store.set(_ack_key(transfer_id), b"1")
        return out

    def close(self) -> None:
        with self._lock:
            self._clients.clear()
            self._store = None
            self._endpoint = None
