"""The KV transport interface: how a prefill replica ships KV blocks to a decode replica.

A transfer moves one contiguous buffer (blocks packed by the engine's ``kv_transfer.read_blocks``)
from a sender (prefill) to a receiver (decode). The receiver *listens*: it publishes a
``TransportEndpoint`` that travels inside the prefill request. The sender *sends* to that
endpoint, tagged with a ``transfer_id`` the receiver chose, and reports back which pair
group carried it; the receiver then *receives* from that group. Every wait has a timeout
and every failure is a ``TransferError``; callers recover by recomputing locally.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class TransferError(RuntimeError):
    """A KV transfer failed or timed out (the caller falls back to local recompute)."""


@dataclass(frozen=True)
class TransportEndpoint:
    """Where a receiver can be reached. Plain data: it crosses Ray process boundaries."""

    # "gloo", "nccl" or "cuda_ipc"; sender and receiver must agree.
    backend: str
    # Rendezvous store (TCPStore) address owned by the receiver.
    host: str
    port: int
    # The receiving replica's id (for logs and pair bookkeeping).
    owner_id: str
    # Further backends the receiver listens on (``AutoTransport``: cuda_ipc beside nccl).
    alternatives: tuple[TransportEndpoint, ...] = ()
    # The receiver's physical GPU ("" on CPU): equal on both ends means CUDA IPC works.
    device_id: str = ""


@dataclass
class SendResult:
    """What the sender tells the receiver so it can post the matching receive."""

    # The pair group (unique per receiver) the buffer travels on.
    group_id: int
    # Shape and dtype of the buffer, so the receiver can allocate it.
    shape: tuple[int, ...]
    dtype: str
    # The backend that carried it ("" = the receiver's primary one); set by AutoTransport.
    backend: str = ""


class SendHandle(ABC):
    """A posted send; ``wait`` blocks until the receiver has the data (or raises)."""

    result: SendResult

    @abstractmethod
    def wait(self, timeout_s: float) -> None:
        """Block until delivered; ``TransferError`` on failure or timeout."""


class KVTransport(ABC):
    """One replica's side of the KV transport (a replica may both send and receive)."""

    backend: str

    @abstractmethod
    def listen(self) -> TransportEndpoint:
        """Start accepting pair groups (idempotent) and return this replica's endpoint."""

    @abstractmethod
    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        """Post ``buffer`` to ``endpoint``'s owner under ``transfer_id``; joins the pair lazily."""

    @abstractmethod
    def recv(
        self, group_id: int, transfer_id: int, shape: tuple[int, ...], dtype: torch.dtype, timeout_s: float
    ) -> torch.Tensor:
        """Receive the buffer sent under ``transfer_id`` on ``group_id`` (blocking, with timeout)."""

    @abstractmethod
    def close(self) -> None:
        """Tear down every pair group and the rendezvous store."""


def dtype_from_str(name: str) -> torch.dtype:
    """``"torch.float32"`` or ``"float32"`` -> ``torch.float32``."""
    attr = name.removeprefix("torch.")
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt
