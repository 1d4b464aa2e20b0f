"""KV transport between prefill and decode replicas: one interface, backends chosen automatically.

``gloo`` (CPU, what CI exercises) and ``nccl`` (between GPUs) share the torch.distributed
code path in ``torch_dist``. ``cuda_ipc`` (both roles on one GPU, where NCCL refuses two
ranks on one device) is offered only once a module providing it is installed: selection
never hands out a backend that does not exist.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from cluster.transport.base import (
    KVTransport,
    SendHandle,
    SendResult,
    TransferError,
    TransportEndpoint,
    dtype_from_str,
)

__all__ = [
    "KVTransport",
    "SendHandle",
    "SendResult",
    "TransferError",
    "TransportEndpoint",
    "available_backends",
    "dtype_from_str",
    "make_transport",
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


def select_backend(requested: str, device: str, *, same_device: bool = False) -> str:
    """Pick the backend: ``auto`` means gloo on CPU, nccl between GPUs, cuda_ipc on a shared GPU.

    ``same_device`` says both roles share one GPU (NCCL refuses two ranks on one device);
    without a cuda_ipc implementation that case falls back to gloo through host memory.
    """
    available = available_backends()
    if requested != "auto":
        if requested not in available:
            raise ValueError(f"KV transport {requested!r} is not available here (have: {available})")
        return requested
    if not device.startswith("cuda"):
        return "gloo"
    if same_device:
        return "cuda_ipc" if "cuda_ipc" in available else "gloo"
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
        return mod.CudaIpcTransport(replica_id, device=device)
    raise ValueError(f"unknown or unavailable KV transport backend {backend!r}")
