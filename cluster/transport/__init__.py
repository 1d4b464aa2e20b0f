"""KV transport between prefill and decode replicas: one interface, backends chosen automatically.

``gloo`` (CPU, what CI exercises) and ``nccl`` (between GPUs) share the torch.distributed
code path in ``torch_dist``. ``cuda_ipc`` (both roles on one GPU, where NCCL refuses two
ranks on one device) lives in ``cuda_ipc``. Replicas use :func:`make_auto_transport`: with
``backend="auto"`` a GPU replica listens on NCCL *and* CUDA IPC and every transfer takes
the one that fits its receiver (``auto.AutoTransport``). Selection never hands out a
backend that does not exist here.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from cluster.transport.auto import AutoTransport, device_identity
from cluster.transport.blocking import run_blocking
from cluster.transport.base import (
    KVTransport,
    SendHandle,
    SendResult,
    TransferError,
    TransportEndpoint,
    dtype_from_str,
)

__all__ = [
    "AutoTransport",
    "KVTransport",
    "SendHandle",
    "SendResult",
    "TransferError",
    "TransportEndpoint",
    "available_backends",
    "dtype_from_str",
    "make_auto_transport",
    "make_transport",
    "run_blocking",
    "select_backend",
]


def _has_cuda_ipc() -> bool:
    return importlib.util.find_spec("cluster.transport.cuda_ipc") is not None


def available_backends() -> list[str]:
    """Backends this process can actually run."""
    import torch.distributed as dist

    out: list[str] = []
    if dist.is_available() and dist.is_gloo_available():
        out.append("gloo")
    if torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available():
        out.append("nccl")
        if _has_cuda_ipc():
            out.append("cuda_ipc")
    return out


def select_backend(requested: str, device: str) -> str:
    """The primary backend: ``auto`` means gloo on CPU and nccl on a GPU (gloo without NCCL).

    cuda_ipc is never the ``auto`` primary: it only reaches a peer on the same GPU, so
    :func:`make_auto_transport` adds it beside the primary and picks it per transfer.
    """
    available = available_backends()
    if requested != "auto":
        if requested not in available:
            raise ValueError(f"KV transport {requested!r} is not available here (have: {available})")
        return requested
    if not device.startswith("cuda"):
        return "gloo"
    return "nccl" if "nccl" in available else "gloo"


def make_transport(
    backend: str,
    replica_id: str,
    *,
    host: str = "127.0.0.1",
    connect_timeout_s: float = 20.0,
    transfer_timeout_s: float = 20.0,
    device: str = "cpu",
) -> KVTransport:
    """Build the transport for a concrete backend name (see ``select_backend``)."""
    if backend in ("gloo", "nccl"):
        from cluster.transport.torch_dist import TorchDistTransport

        return TorchDistTransport(
            backend, replica_id, host=host, connect_timeout_s=connect_timeout_s,
            transfer_timeout_s=transfer_timeout_s, device=device,
        )
    if backend == "cuda_ipc" and _has_cuda_ipc():
        mod = importlib.import_module("cluster.transport.cuda_ipc")
        return mod.CudaIpcTransport(replica_id, device=device, host=host, connect_timeout_s=connect_timeout_s)
    raise ValueError(f"unknown or unavailable KV transport backend {backend!r}")


def make_auto_transport(
    requested: str,
    replica_id: str,
    *,
    device: str = "cpu",
    host: str = "127.0.0.1",
    connect_timeout_s: float = 20.0,
    transfer_timeout_s: float = 20.0,
) -> AutoTransport:
    """A replica's transport: the primary backend, plus cuda_ipc on a GPU when ``auto``.

    An explicit ``requested`` backend is used alone (for every peer).
    """
    primary_name = select_backend(requested, device)
    options = dict(host=host, connect_timeout_s=connect_timeout_s, transfer_timeout_s=transfer_timeout_s, device=device)
    primary = make_transport(primary_name, replica_id, **options)
    ipc = None
    identity = device_identity(device) if device.startswith("cuda") else ""
    if requested == "auto" and primary_name == "nccl" and "cuda_ipc" in available_backends() and identity:
        ipc = make_transport("cuda_ipc", replica_id, **options)
    return AutoTransport(primary, ipc, identity)
