"""ServeConfig: defaults fit a 2-CPU box, YAML round trip, strict keys, CLI-style overrides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import ServeConfig, load_config


def test_defaults_fit_four_logical_cpus() -> None:
    cfg = ServeConfig()
    total = (
        cfg.ingress.num_cpus * cfg.ingress.num_replicas
        + cfg.prefill.num_cpus * cfg.prefill.num_replicas
        + cfg.decode.num_cpus * cfg.decode.num_replicas
    )
    assert total <= 2.0
    assert cfg.http.host == "127.0.0.1" and cfg.http.port == 8000
    assert cfg.model.model == "default"
    assert cfg.prefill.torch_threads == 1


def test_every_field_has_a_description() -> None:
    def walk(model_cls: type) -> None:
        for name, f in model_cls.model_fields.items():
            assert f.description, f"{model_cls.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(ServeConfig)


def test_yaml_round_trip_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("engine:\n  block_size: 8\ndecode:\n  num_replicas: 3\n")
    cfg = load_config(p, {"http.port": 9123, "decode.num_replicas": None, "prefill.num_cpus": 0.25})
    assert cfg.engine.block_size == 8 and cfg.engine_config("decode", "d").block_size == 8
    assert cfg.decode.num_replicas == 3  # None override leaves the file's value
    assert cfg.http.port == 9123 and cfg.prefill.num_cpus == 0.25
    p2 = tmp_path / "d.yaml"
    p2.write_text(cfg.to_yaml())
    assert ServeConfig.from_yaml(p2) == cfg


def test_unknown_keys_and_bad_values_are_rejected(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("engine:\n  blocksize: 8\n")
    with pytest.raises(ValidationError):
        ServeConfig.from_yaml(p)
    with pytest.raises(ValueError):
        ServeConfig().with_overrides({"http.nope": 1})
    with pytest.raises(ValidationError):
        ServeConfig().with_overrides({"decode.num_cpus": -1})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"engine": {"default_ttl_s": 7200, "max_ttl_s": 3600}})
    with pytest.raises(ValidationError, match="blok_size"):  # a typo in a pool's overrides fails at load
        ServeConfig.model_validate({"decode": {"engine": {"blok_size": 8}}})


def test_the_documented_yaml_example_is_valid(tmp_path) -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    p = tmp_path / "doc.yaml"
    p.write_text(block)
    cfg = ServeConfig.from_yaml(p)
    assert cfg.engine.local_prefill_threshold == 64 and cfg.transport.backend == "auto"


def test_every_yaml_example_in_the_serving_docs_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 2  # the CPU example and the GPU one
    for block in blocks:
        ServeConfig.model_validate(yaml.safe_load(block))


def test_engine_defaults_live_in_one_place() -> None:
    from engine import EngineConfig

    cfg = ServeConfig()
    per_replica = {"role", "replica_id", "device", "num_threads"}
    for role in ("prefill", "decode", "mixed"):
        resolved = cfg.engine_config(role, f"{role}#1").model_dump()
        assert {k: v for k, v in resolved.items() if k not in per_replica} == {
            k: v for k, v in EngineConfig().model_dump().items() if k not in per_replica
        }
        assert resolved["role"] == role and resolved["replica_id"] == f"{role}#1"
        assert resolved["num_threads"] == cfg.pool(role).torch_threads and resolved["device"] == "cpu"


def test_pools_override_engine_settings_for_themselves_only() -> None:
    cfg = ServeConfig.model_validate({
        "engine": {"max_num_seqs": 32, "block_size": 32},
        "decode": {"engine": {"max_num_seqs": 128}, "num_gpus": 1},
        "prefill": {"engine": {"max_num_batched_tokens": 4096}},
    })
    decode, prefill = cfg.engine_config("decode", "d"), cfg.engine_config("prefill", "p")
    assert (decode.max_num_seqs, decode.max_num_batched_tokens, decode.device) == (128, 512, "cuda")
    assert (prefill.max_num_seqs, prefill.max_num_batched_tokens, prefill.device) == (32, 4096, "cpu")
    assert decode.block_size == prefill.block_size == 32


@pytest.mark.parametrize("data", [
    {"engine": {"role": "decode"}},
    {"engine": {"device": "cuda"}},
    {"decode": {"engine": {"replica_id": "x"}}},
    {"prefill": {"engine": {"num_threads": 4}}},
])
def test_per_replica_engine_settings_come_from_the_pool(data) -> None:
    with pytest.raises(ValidationError, match="per replica"):
        ServeConfig.model_validate(data)


def test_routing_knobs_reach_the_request_routers() -> None:
    from cluster.app import _router_options

    cfg = ServeConfig.model_validate({"routing": {"affinity_weight": 0.8, "imbalance_ratio": 3.0,
                                                  "lookup_timeout_s": 0.1, "stats_period_s": 0.5,
                                                  "host_promote_us_per_token": 4.0}})
    assert cfg.routing.request_router == "kvferry"  # kvferry's routers are the default
    decode = _router_options(cfg, "decode")["request_router_config"]
    prefill = _router_options(cfg, "prefill")["request_router_config"]
    tiers = {"host_promote_us_per_token": 4.0, "disk_promote_us_per_token": cfg.routing.disk_promote_us_per_token,
             "prefill_tokens_per_s": cfg.routing.prefill_tokens_per_s}  # both pools credit tier hits
    assert decode.request_router_kwargs == {"pool": "decode", "affinity_weight": 0.8, "imbalance_load": 0.5,
                                            "lookup_timeout_s": 0.1, "speculative_ttl_s": 10.0, **tiers}
    assert tiers.items() <= prefill.request_router_kwargs.items()
    assert prefill.request_router_kwargs["imbalance_ratio"] == 3.0 and "affinity_weight" not in prefill.request_router_kwargs
    assert decode.request_routing_stats_period_s == 0.5
    assert _router_options(ServeConfig.model_validate({"routing": {"request_router": "default"}}), "decode") == {}


def test_auto_pool_gets_serve_autoscaling_and_fixed_pool_keeps_num_replicas() -> None:
    from cluster.app import deployment_options

    cfg = ServeConfig.model_validate({
        "decode": {"num_replicas": "auto", "autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                          "target_ongoing_requests": 2}},
        "prefill": {"num_replicas": 2, "node_labels": {"ray.io/node-group": "prefill"}},
    })
    decode = deployment_options(cfg, "decode")
    assert "num_replicas" not in decode
    assert decode["autoscaling_config"]["max_replicas"] == 3
    assert decode["autoscaling_config"]["target_ongoing_requests"] == 2
    prefill = deployment_options(cfg, "prefill")
    assert prefill["num_replicas"] == 2 and "autoscaling_config" not in prefill
    assert prefill["ray_actor_options"]["label_selector"] == {"ray.io/node-group": "prefill"}
    assert (cfg.decode.min_replicas, cfg.decode.max_replicas) == (1, 3)


@pytest.mark.parametrize("pool", [
    {"num_replicas": "auto", "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
    {"num_replicas": "auto", "autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}},
    {"num_replicas": -1},
    {"num_replicas": "many"},
])
def test_bad_pool_sizes_are_refused(pool: dict) -> None:
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"decode": pool})
