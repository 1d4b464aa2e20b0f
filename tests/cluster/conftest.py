"""Cluster-test fixtures: a tiny random Llama per module, its offline reference engine, and
``deploy_app`` to run one kvferry application on the session's Ray cluster (always torn down)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (byte-level tokenizer, chat template), built once per module."""
    from tests.engine.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("cluster-model"))


@pytest.fixture(scope="module")
def reference_engine(tiny_model: Path) -> Any:
    """The same weights run offline in this process: the token-for-token reference."""
    from engine import LLMEngine

    return LLMEngine.from_pretrained(str(tiny_model), role="mixed", block_size=16, num_kv_blocks=256)


@contextmanager
def deploy_app(app_name: str, settings: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Run ``ServeConfig(app_name=..., **settings)`` on a free loopback port; yield (url, config).

    Serve's gRPC proxy starts too, on another free port (``config.grpc.port``), as
    ``kvferry serve`` starts it: proxy options are fixed when Serve starts."""
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ServeConfig
    from cluster.grpc.options import grpc_options

    port, grpc_port = free_port(), free_port()
    http = {**settings.get("http", {}), "port": port}
    cfg = ServeConfig.model_validate({**settings, "app_name": app_name, "http": http, "grpc": {"port": grpc_port}})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options(grpc_port))
    serve.run(build_app(cfg), name=app_name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        serve.delete(app_name)
        serve.shutdown()


def kill_replica(app_name: str, pool: str, replica_id: str | None = None) -> None:
    """Kill one replica actor of ``pool`` in ``app_name`` for good (no restart): the one whose
    id ends like ``replica_id`` if given, else the pool's only replica."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app_name}#{pool}#")]
    if replica_id is not None:
        names = [n for n in names if n.endswith("#" + replica_id.rsplit("#", 1)[-1])]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
