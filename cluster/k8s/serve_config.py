"""The RayService's ``serveConfigV2``: kvferry's ``ServeConfig`` as a Serve config file.

One application, ``import_path: cluster.app:build_app`` with the (pinned) ``ServeConfig``
as ``args``, and a ``deployments`` list from ``cluster.app.deployment_options``: the very
options ``build_app`` gives Serve, so the numbers a reader sees in the manifest are the
ones Serve applies (the config file's options override the code's; here they are equal).
"""

from __future__ import annotations

from typing import Any

from cluster.config import ServeConfig
from cluster.grpc.options import grpc_options
from cluster.k8s.pinning import mode_pools

IMPORT_PATH = "cluster.app:build_app"
#: Inside a pod the Serve proxy must listen on the pod IP, not loopback.
POD_HTTP_HOST = "0.0.0.0"


def pod_config(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` as it runs in pods: the HTTP proxy on every interface; a fixed metrics port."""
    if cfg.metrics.export_port == 0:
        raise ValueError("metrics.export_port is 0 (any free port): on Kubernetes name a port, e.g. 8080")
    return cfg.with_overrides({"http.host": POD_HTTP_HOST})


def _deployments(cfg: ServeConfig) -> list[dict[str, Any]]:
    from cluster.app import deployment_options  # imports Ray Serve: only when rendering

    return [deployment_options(cfg, name) for name in (*mode_pools(cfg), "ingress")]


def serve_config(cfg: ServeConfig) -> dict[str, Any]:
    """The Serve config (``ray.serve.schema.ServeDeploySchema`` shape) for ``cfg``.

    ``cfg`` is the pod config (``pod_config`` of the pinned config): its ``args`` are what
    ``build_app`` receives in the cluster. ``grpc.port`` 0 leaves gRPC out.
    """
    grpc = grpc_options(cfg.grpc.port)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        # kvferry.v1.Inference with reflection (cluster/grpc), the same options `kvferry serve` uses.
        **({"grpc_options": grpc} if grpc else {}),
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": IMPORT_PATH,
            "args": cfg.model_dump(mode="json"),
            "deployments": _deployments(cfg),
        }],
    }
