"""Cluster-test fixtures: a tiny random Llama per session, its offline reference engine per
module, ``deploy_app`` to run one kvferry application on the session's Ray cluster (always
deleted afterwards), and ``colocated_server``: one colocated tiny-model app shared by the
modules that ask for it.

Two things are started once and reused, because each costs seconds on the 2-core CI box:
- Serve itself (its controller and HTTP proxy): the first deploy starts it on a free port and
  later deploys reuse it; apps are deleted, Serve stays up until the last test of this folder
  has run (``release_serve``: the tests after these find the cluster as these found it).
- a kept app (``kept_app``): left deployed after a module ends, so the next module asking for
  the same app with the same settings gets it without a second deploy. Any other deploy
  retires it first, so it never outlives its users by more than the modules that don't use
  Ray. Modules share it only if they run back to back: pytest runs a folder's files in name
  order, which is why the users are named ``test_api_*.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

# One colocated replica of the tiny Llama with a 128-token context: what the API fuzzing and
# the hostile-input modules need (the fuzzer's schema-valid requests stay bounded by it).
COLOCATED_APP = "kvferry-colocated"
COLOCATED_ENGINE = {"num_kv_blocks": 128, "block_size": 16, "max_model_len": 128}

# The HTTP and gRPC ports of the Serve instance these fixtures started, while it runs.
_serve: dict[str, int] = {}
# The app kept deployed across modules (kept_app): its name, settings and URL; empty if none.
_kept: dict[str, Any] = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (byte-level tokenizer, chat template), built once per session
    (seeded: every build has the same weights, so modules can share one)."""
    from tests.engine.tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("cluster-model"))


@pytest.fixture(scope="module")
def reference_engine(tiny_model: Path) -> Any:
    """The same weights run offline in this process: the token-for-token reference."""
    from engine import LLMEngine

    return LLMEngine.from_pretrained(str(tiny_model), role="mixed", block_size=16, num_kv_blocks=256)


@pytest.fixture(scope="module")
def colocated_server(ray_cluster: dict, tiny_model: Path) -> str:
    """The URL of one colocated replica of ``tiny_model`` (context 128), shared across modules."""
    settings = {
        "mode": "colocated",
        "mixed": {"num_replicas": 1},
        "model": {"model": str(tiny_model)},
        "engine": COLOCATED_ENGINE,
    }
    return kept_app(COLOCATED_APP, settings)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After this folder's last test (its fixtures are torn down by now), shut Serve down."""
    if nextitem is None or Path(__file__).resolve().parent not in Path(nextitem.path).resolve().parents:
        release_serve()


def _serve_is_up() -> bool:
    """Whether Serve's controller runs on the cluster (``serve.status()`` cannot tell: without
    one it answers an empty status)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _serve_ports() -> tuple[int, int]:
    """Start Serve on free loopback ports (HTTP, and its gRPC proxy as ``kvferry serve`` starts
    it: proxy options are fixed when Serve starts) unless the instance started here still runs."""
    from ray import serve

    from cluster.grpc.options import grpc_options

    if "port" not in _serve or not _serve_is_up():
        if _serve_is_up():  # someone else's instance, on a port we don't know
            serve.shutdown()
        _serve["port"], _serve["grpc_port"] = free_port(), free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _serve["port"]},
                    grpc_options=grpc_options(_serve["grpc_port"]))
    return _serve["port"], _serve["grpc_port"]


def _start_app(app_name: str, settings: dict[str, Any]) -> tuple[str, Any]:
    from ray import serve

    from cluster.app import build_app
    from cluster.config import ServeConfig

    port, grpc_port = _serve_ports()
    http = {**settings.get("http", {}), "port": port}
    cfg = ServeConfig.model_validate({**settings, "app_name": app_name, "http": http, "grpc": {"port": grpc_port}})
    serve.run(build_app(cfg), name=app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg


def _app_status(app_name: str) -> str | None:
    """Serve's status of ``app_name`` ("RUNNING", "UNHEALTHY", ...), None if it is not there."""
    from ray import serve

    if not _serve_is_up():
        return None
    app = serve.status().applications.get(app_name)
    return None if app is None else app.status  # a str enum: compares equal to "RUNNING"


@contextmanager
def deploy_app(app_name: str, settings: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Run ``ServeConfig(app_name=..., **settings)`` at ``/`` of the session's Serve; yield (url, config)."""
    from ray import serve

    retire_kept_app()
    url, cfg = _start_app(app_name, settings)
    try:
        yield url, cfg
    finally:
        serve.delete(app_name)


def kept_app(app_name: str, settings: dict[str, Any]) -> str:
    """Like ``deploy_app``, but left running for the next module that asks for the same app
    with the same settings; returns its URL. Retired by any other deploy or by ``release_serve``."""
    if _kept.get("name") == app_name and _kept["settings"] == settings and _app_status(app_name) == "RUNNING":
        return _kept["url"]
    retire_kept_app()
    url, _ = _start_app(app_name, settings)
    _kept.update(name=app_name, settings=settings, url=url)
    return url


def retire_kept_app() -> None:
    """Delete the kept app, if one is still deployed."""
    from ray import serve

    if not _kept:
        return
    name = _kept["name"]
    _kept.clear()
    if _app_status(name) is not None:
        serve.delete(name)


def release_serve() -> None:
    """Delete the kept app and shut Serve down, so that another process (``kvferry serve
    --address``) can start Serve with its own HTTP port. Nothing to do without Ray."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return  # and no ray call here: one would start a local Ray of its own
    from ray import serve

    retire_kept_app()
    _serve.clear()
    if _serve_is_up():
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
