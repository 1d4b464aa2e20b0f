"""Helpers every serving replica shares: its id, its thread budget, its transport."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from cluster.config import ServeConfig
from cluster.transport import AutoTransport, make_auto_transport

T = TypeVar("T")


def replica_id(fallback: str) -> str:
    """This Serve replica's full id (``fallback`` outside Serve).

    The full id (app#deployment#unique) is also the engine's ``replica_id``: the KV
    directory keys replicas by it, so the routers can map directory hits to replicas.
    """
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - not inside a replica (unit tests, scripts)
        return fallback


def limit_threads(num_threads: int) -> None:
    """One replica must not grab every core: several share a small box."""
    torch.set_num_threads(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(num_threads)


def build_transport(cfg: ServeConfig, role: str, rid: str) -> AutoTransport:
    """The KV transport of a replica: backends from the config and the device, chosen per peer."""
    device = "cuda" if cfg.pool(role).num_gpus > 0 else "cpu"
    host = cfg.transport.host
    if host == "auto":
        # Peers on other nodes must reach this replica's store: advertise the node's IP.
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray: single machine
            host = "127.0.0.1"
    return make_auto_transport(
        cfg.transport.backend,
        rid,
        host=host,
        connect_timeout_s=cfg.transport.connect_timeout_s,
        transfer_timeout_s=cfg.transport.transfer_timeout_s,
        device=device,
    )


_TRANSPORT_POOL: ThreadPoolExecutor | None = None


def transport_executor() -> ThreadPoolExecutor:
    """Threads for blocking transport calls (joins, sends, receives), apart from asyncio's
    default pool so many in-flight transfers never starve other ``to_thread`` users."""
    global _TRANSPORT_POOL
    if _TRANSPORT_POOL is None:
        _TRANSPORT_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kv-transport")
    return _TRANSPORT_POOL


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the transport executor."""
    return await asyncio.get_running_loop().run_in_executor(transport_executor(), fn, *args)
