"""EngineConfig: one validated settings model, defaults in one place, clear refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine import EngineConfig, LLMEngine


def test_defaults_live_in_the_fields() -> None:
    cfg = EngineConfig()
    assert cfg.kv_cache_memory_bytes == 256 * 1024 * 1024 and cfg.num_kv_blocks is None
    assert cfg.local_prefill_threshold == 64 and cfg.role == "mixed" and cfg.block_size == 16
    assert all(f.description for f in EngineConfig.model_fields.values())


def test_a_misspelt_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['blok_size'\].*'block_size'.*valid: \["):
        EngineConfig.model_validate({"blok_size": 16})


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"block_size": 12}, "power of two"),
        ({"block_size": 0}, "block_size"),
        ({"default_ttl_s": 600.0, "max_ttl_s": 300.0}, "must not exceed max_ttl_s"),
        ({"num_kv_blocks": 1}, "num_kv_blocks"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes"),
        ({"role": "both"}, "role"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "gpu"}, "device"),
        ({"attention_backend": "xformers"}, "attention_backend"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"local_prefill_threshold": -1}, "local_prefill_threshold"),
    ],
)
def test_bad_settings_are_refused_once_with_the_field_named(options: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        EngineConfig.model_validate(options)


def test_the_config_is_frozen() -> None:
    cfg = EngineConfig(role="decode")
    with pytest.raises(ValidationError):
        cfg.role = "prefill"  # type: ignore[misc]


def test_the_clock_is_an_engine_argument_not_a_setting(tiny_model_dir) -> None:
    assert "clock" not in EngineConfig.model_fields
    eng = LLMEngine.from_pretrained(str(tiny_model_dir("llama")), num_kv_blocks=8, clock=lambda: 42.0)
    assert eng.clock() == 42.0
    with pytest.raises(ValueError, match="unknown engine option"):
        LLMEngine.from_pretrained(str(tiny_model_dir("llama")), num_kv_blocks=8, clok=lambda: 42.0)
