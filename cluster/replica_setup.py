"""What every serving replica does when it starts: learn its id, size its threads, build its transport."""

from __future__ import annotations

import os

import torch

from cluster.config import ServeConfig
from cluster.transport import AutoTransport, make_auto_transport


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
