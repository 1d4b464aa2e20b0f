"""``build_app(config)``: the Ray Serve application (the import path KubeRay uses).

KubeRay's RayService points at ``cluster.app:build_app`` with the config as ``args``;
the CLI calls it with a ``ServeConfig``. Disaggregated mode wires
``Ingress -> DecodeServer(role=decode) -> PrefillServer``; colocated mode wires
``Ingress -> DecodeServer(role=mixed)`` with no prefill pool.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.config import PoolConfig, ServeConfig
from cluster.decode import DecodeServer
from cluster.ingress import Ingress
from cluster.prefill import PrefillServer
from router.serve_routers import request_router_config


def _actor_options(pool: PoolConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    if pool.resources:
        opts["resources"] = dict(pool.resources)
    if pool.node_labels:
        opts["label_selector"] = dict(pool.node_labels)
    return opts


def _router_options(cfg: ServeConfig, pool_name: str) -> dict[str, Any]:
    """Serve deployment options that plug kvferry's RequestRouters in (the default)."""
    if cfg.routing.request_router == "default":
        return {}
    knobs = cfg.routing.model_dump(exclude={"request_router", "stats_period_s"})
    return {"request_router_config": request_router_config(pool_name, knobs, cfg.routing.stats_period_s)}


def _replica_options(pool: PoolConfig) -> dict[str, Any]:
    """A fixed ``num_replicas``, or Serve's ``autoscaling_config`` for an ``auto`` pool."""
    if pool.autoscaled:
        return {"autoscaling_config": pool.autoscaling.serve_options()}
    return {"num_replicas": pool.num_replicas}


def deployment_options(cfg: ServeConfig, name: str) -> dict[str, Any]:
    """Serve deployment options of one deployment ("prefill", "decode", "mixed" or "ingress").

    Plain data only (no router objects), so ``kvferry k8s render`` writes the same numbers
    into a RayService that ``build_app`` gives Serve here.
    """
    # A replica being replaced (redeploy, scale-down) stops taking requests and finishes the
    # ones it has: a stream may run as long as the ingress lets any request run.
    drain = {"graceful_shutdown_timeout_s": cfg.http.request_timeout_s, "graceful_shutdown_wait_loop_s": 1.0}
    if name == "ingress":
        return {
            "name": "ingress",
            **_replica_options(cfg.ingress),
            "ray_actor_options": {"num_cpus": cfg.ingress.num_cpus},
            "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
            **drain,
        }
    pool = cfg.pool(name)
    return {
        "name": name,
        **_replica_options(pool),
        "ray_actor_options": _actor_options(pool),
        "max_ongoing_requests": pool.max_ongoing_requests,
        "max_queued_requests": pool.max_queued_requests,
        # Models take a while to load on a small box; don't let Serve give up on them.
        "health_check_timeout_s": 60.0,
        **drain,
    }


def _pool_options(cfg: ServeConfig, name: str) -> dict[str, Any]:
    return {**deployment_options(cfg, name), **_router_options(cfg, name)}


def build_app(config: ServeConfig | dict[str, Any] | None = None) -> Application:
    """The whole application for ``config`` (a ``ServeConfig``, its dict form, or defaults)."""
    if config is None:
        cfg = ServeConfig()
    elif isinstance(config, ServeConfig):
        cfg = config
    else:
        cfg = ServeConfig.model_validate(config)
    data = cfg.model_dump(mode="json")
    if cfg.mode == "disaggregated":
        if cfg.prefill.min_replicas < 1 or cfg.decode.min_replicas < 1:
            raise ValueError("disaggregated mode needs at least one prefill and one decode replica")
        prefill = PrefillServer.options(**_pool_options(cfg, "prefill")).bind(data)
        decode = DecodeServer.options(**_pool_options(cfg, "decode")).bind(data, prefill)
    else:
        if cfg.mixed.min_replicas < 1:
            raise ValueError("colocated mode needs at least one mixed replica")
        decode = DecodeServer.options(**_pool_options(cfg, "mixed")).bind(data, None)
    return Ingress.options(**deployment_options(cfg, "ingress")).bind(data, decode)
