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
    p.write_text("model:\n  block_size: 8\ndecode:\n  num_replicas: 3\n")
    cfg = load_config(p, {"http.port": 9123, "decode.num_replicas": None, "prefill.num_cpus": 0.25})
    assert cfg.model.block_size == 8
    assert cfg.decode.num_replicas == 3  # None override leaves the file's value
    assert cfg.http.port == 9123 and cfg.prefill.num_cpus == 0.25
    p2 = tmp_path / "d.yaml"
    p2.write_text(cfg.to_yaml())
    assert ServeConfig.from_yaml(p2) == cfg


def test_unknown_keys_and_bad_values_are_rejected(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  blocksize: 8\n")
    with pytest.raises(ValidationError):
        ServeConfig.from_yaml(p)
    with pytest.raises(ValueError):
        ServeConfig().with_overrides({"http.nope": 1})
    with pytest.raises(ValidationError):
        ServeConfig().with_overrides({"decode.num_cpus": -1})
    with pytest.raises(ValidationError):
        ServeConfig.model_validate({"cache": {"default_ttl_s": 7200, "max_ttl_s": 3600}})


def test_the_documented_yaml_example_is_valid(tmp_path) -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    p = tmp_path / "doc.yaml"
    p.write_text(block)
    cfg = ServeConfig.from_yaml(p)
    assert cfg.cache.local_prefill_threshold == 64 and cfg.transport.backend == "auto"


def test_every_yaml_example_in_the_serving_docs_is_a_valid_config():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) >= 2  # the CPU example and the GPU one
    for block in blocks:
        ServeConfig.model_validate(yaml.safe_load(block))
