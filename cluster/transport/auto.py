"""Per-pair transport choice: cuda_ipc when both replicas share a GPU, else NCCL or gloo.

Which backend fits a transfer depends on *both* ends, so a replica cannot pick it alone at
start-up: Ray may place a prefill and a decode replica on one GPU (fractional ``num_gpus``),
where NCCL refuses two ranks on the same device, or on two GPUs, where CUDA IPC cannot
reach. :class:`AutoTransport` therefore listens on every backend it has and publishes one
endpoint that lists them all, stamped with the identity of its GPU (the device UUID,
unique across machines). The sender compares that identity with its own: the same GPU
means ``cuda_ipc``, anything else the primary backend (``nccl`` between GPUs, ``gloo`` on
CPU). The backend used travels back in ``SendResult.backend`` so the receiver reads from
the matching transport.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from cluster.transport.base import KVTransport, SendHandle, TransferError, TransportEndpoint

logger = logging.getLogger(__name__)


def device_identity(device: torch.device | str) -> str:
    """A string equal in two processes exactly when they use the same physical GPU ("" on CPU).

    Uses the GPU's UUID, not its index: each Ray replica sees its GPUs renumbered from 0
    (``CUDA_VISIBLE_DEVICES``), so ``cuda:0`` in two replicas may be two different cards.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"gpu-{uuid}" if uuid else ""


class AutoTransport(KVTransport):
    """One replica's transports behind one interface, the backend chosen per receiver."""

    backend = "auto"

    def __init__(self, primary: KVTransport, ipc: KVTransport | None = None, device_id: str = "") -> None:
        # ``primary`` reaches any peer of the same kind (gloo: any CPU peer; nccl: a peer on
        # another GPU); ``ipc`` only a peer on this very GPU, so it needs a device identity.
        self.primary = primary
        self.ipc = ipc if device_id else None
        self.device_id = device_id
        self._by_backend = {t.backend: t for t in (primary, self.ipc) if t is not None}

    def listen(self) -> TransportEndpoint:
        main = self.primary.listen()
        alternatives = tuple(t.listen() for t in self._by_backend.values() if t is not self.primary)
        return dataclasses.replace(main, alternatives=alternatives, device_id=self.device_id)

    def choose(self, endpoint: TransportEndpoint) -> tuple[KVTransport, TransportEndpoint]:
        """The transport and the receiver's matching endpoint for a transfer to ``endpoint``."""
        offers = {e.backend: e for e in (endpoint, *endpoint.alternatives)}
        if self.ipc is not None and endpoint.device_id == self.device_id and "cuda_ipc" in offers:
            return self.ipc, offers["cuda_ipc"]
        for backend, transport in self._by_backend.items():
            if transport is self.ipc:
                continue  # only ever right on a shared GPU, handled above
            if backend in offers:
                return transport, offers[backend]
        raise TransferError(
            f"no common KV transport with {endpoint.owner_id}: it offers {sorted(offers)}, "
            f"this replica has {sorted(self._by_backend)}"
        )

    def send(self, endpoint: TransportEndpoint, transfer_id: int, buffer: torch.Tensor) -> SendHandle:
        transport, target = self.choose(endpoint)
        handle = transport.send(target, transfer_id, buffer)
        handle.result.backend = transport.backend
        return handle

    def recv(
        self,
        group_id: int,
        transfer_id: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        timeout_s: float,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Receive from the transport the sender used (``SendResult.backend``; None = primary)."""
        transport = self._by_backend.get(backend or self.primary.backend)
        if transport is None:
            raise TransferError(f"sender used KV transport {backend!r}, which this replica does not run")
        return transport.recv(group_id, transfer_id, shape, dtype, timeout_s)

    def close(self) -> None:
        for transport in self._by_backend.values():
            try:
                transport.close()
            except Exception as e:  # noqa: BLE001 - close the others regardless
                logger.warning("closing %s transport failed: %s", transport.backend, e)
