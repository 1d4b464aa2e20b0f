"""Serving configuration: pydantic models loadable from YAML and overridable by CLI flags.

One ``ServeConfig`` describes a whole deployment: the model, the KV cache, the two pools
(prefill and decode, or one ``mixed`` pool for colocated serving), the prompt-cache TTLs,
the transport and the HTTP front. Every model forbids unknown keys so a typo in a YAML
file fails loudly instead of silently using a default.

Defaults fit a 2-CPU laptop/CI box: fractional ``num_cpus`` per replica so ingress and both
pools fit in a Ray cluster started with 4 logical CPUs, and one torch thread per replica.
"""

from __future__ import annotations

import time

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    """Base: unknown keys are an error (a misspelt YAML key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PoolConfig(_Strict):
    """One pool of identical replicas (the prefill pool, the decode pool or a mixed pool)."""

    num_replicas: int = Field(1, ge=0, description="Number of replicas in this pool (0 disables it).")
    num_cpus: float = Field(
        0.5, gt=0, description="Ray logical CPUs reserved per replica (fractional is fine on CPU)."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; > 0 runs the engine on CUDA.")
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads in each replica.")
    max_num_seqs: int = Field(64, ge=1, description="Maximum concurrently running sequences per replica.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Per-step token budget of the scheduler (chunked prefill)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Ray Serve's cap on requests in flight per replica."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray custom resources per replica (pins a pool to labelled nodes on KubeRay).",
    )


class ModelConfig(_Strict):
    """Which model to serve and how to hold its weights and KV cache."""

    model: str = Field(
        "default",
        description='HF model directory, a .gguf file, or "default" (embedded SmolLM2-135M-Instruct).',
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; defaults to the engine's model id."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    kv_cache_memory_bytes: int | None = Field(
        256 * 1024 * 1024, ge=1, description="KV cache budget per replica in bytes (None: num_kv_blocks)."
    )
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Exact number of KV blocks per replica; overrides the byte budget."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights and KV dtype."
    )
    attention_backend: Literal["torch", "triton", "flash_attn"] = Field(
        "torch", description='Attention backend: "torch" (SDPA; CPU), "triton" (GPU) or "flash_attn" (GPU, optional package).'
    )
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused Triton residual+RMSNorm and rotary kernels (auto: off until measured on a GPU)."
    )
    prefill_attention: Literal["auto", "triton", "sdpa"] = Field(
        "auto", description='Prefill path of the "triton" backend: the varlen paged kernel or torch SDPA.'
    )
    enforce_eager: bool = Field(False, description="Never capture CUDA graphs for decode steps.")
    max_model_len: int | None = Field(None, ge=1, description="Context limit; None = the model's own.")
    default_max_tokens: int = Field(
        256, ge=1, description="Tokens generated when a request sets no max_tokens (capped by the context)."
    )


class CacheConfig(_Strict):
    """Prompt-cache TTLs (provider-style: sliding window, longer retention on request)."""

    default_ttl_s: float = Field(300.0, gt=0, description="TTL of cached blocks when a request asks for none.")
    max_ttl_s: float = Field(3600.0, gt=0, description="Longest TTL a request may ask for (longer is clamped).")
    local_prefill_threshold: int = Field(
        64,
        ge=0,
        description="Decode replicas prefill locally when fewer uncached prompt tokens than this remain.",
    )
    export_lease_timeout_s: float = Field(
        30.0, gt=0, description="Prefill replicas free exported blocks the decode side never released."
    )
    tenant_isolation: Literal["api_key", "none"] = Field(
        "api_key",
        description=(
            "api_key: cached blocks are salted with a hash of the request's API key, so tenants "
            "never hit (or time) each other's prompt cache; requests without a key share one "
            "anonymous tenant. none: every request shares one cache."
        ),
    )

    @model_validator(mode="after")
    def _ttl_order(self) -> CacheConfig:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(f"default_ttl_s ({self.default_ttl_s}) exceeds max_ttl_s ({self.max_ttl_s})")
        return self


class TransportConfig(_Strict):
    """KV transport between prefill and decode replicas."""

    backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = Field(
        "auto", description="KV transport backend; auto picks gloo on CPU, nccl between GPUs."
    )
    host: str = Field(
        "auto",
        description='Address a receiving replica advertises for its rendezvous store; "auto" = its Ray node IP.',
    )
    connect_timeout_s: float = Field(20.0, gt=0, description="Timeout to form a 2-rank process group.")
    transfer_timeout_s: float = Field(20.0, gt=0, description="Timeout of one KV transfer (send or recv).")


class HttpConfig(_Strict):
    """The HTTP front (Serve's proxy)."""

    host: str = Field("127.0.0.1", description="Interface the HTTP proxy binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP proxy.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="Ingress gives up on a request (and aborts it) after this long."
    )
    prefill_timeout_s: float = Field(
        60.0, gt=0, description="Decode replicas fall back to local prefill after waiting this long."
    )
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="Request bodies larger than this get 413 before they are parsed."
    )


class FailoverConfig(_Strict):
    """How decode replicas notice that the prefill pool is down (and prefill locally meanwhile)."""

    suspect_after_s: float = Field(
        0.5, gt=0, description="A prefill call unanswered this long makes decode replicas probe the pool."
    )
    probe_timeout_s: float = Field(
        1.0, gt=0, description="A probe unanswered this long marks the pool down: requests prefill locally."
    )
    probe_interval_s: float = Field(
        1.0, gt=0, description="While the pool is down, probe it this often; the first answer brings it back."
    )


class ServeConfig(_Strict):
    """The whole serving application."""

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: prefill + decode pools; colocated: one pool of `mixed` replicas.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model and KV cache.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Prompt-cache TTLs.")
    prefill: PoolConfig = Field(default_factory=PoolConfig, description="The prefill pool.")
    decode: PoolConfig = Field(default_factory=PoolConfig, description="The decode pool.")
    mixed: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_replicas=2),
        description="The colocated pool (mode=colocated only).",
    )
    ingress: PoolConfig = Field(
        default_factory=lambda: PoolConfig(num_cpus=0.25, max_ongoing_requests=256),
        description="The ingress deployment (FastAPI); only num_replicas/num_cpus/max_ongoing_requests apply.",
    )
    transport: TransportConfig = Field(default_factory=TransportConfig, description="KV transport.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP front and timeouts.")
    failover: FailoverConfig = Field(
        default_factory=FailoverConfig, description="Prefill-pool outage detection (local prefill meanwhile)."
    )
    request_router: Literal["default", "kvferry"] = Field(
        "default", description="Serve's default routing or kvferry's cache-affinity RequestRouters."
    )
    app_name: str = Field("kvferry", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Load a config from a YAML file (unknown keys are an error)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    def with_overrides(self, overrides: dict[str, Any]) -> ServeConfig:
        """Return a copy with dotted-path overrides applied, e.g. ``{"http.port": 9000}``.

        ``None`` values are skipped so CLI flags that were not given leave the file's value.
        """
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if key not in node or not isinstance(node[key], dict):
                    raise ValueError(f"unknown config key: {dotted}")
                node = node[key]
            if leaf not in node:
                raise ValueError(f"unknown config key: {dotted}")
            node[leaf] = value
        return type(self).model_validate(data)

    def pool(self, role: str) -> PoolConfig:
        """The pool config of a role ("prefill", "decode" or "mixed")."""
        return {"prefill": self.prefill, "decode": self.decode, "mixed": self.mixed}[role]

    def engine_options(self, role: str, replica_id: str) -> dict[str, Any]:
        """Keyword arguments for ``engine.LLMEngine.from_pretrained`` for one replica."""
        pool = self.pool(role)
        return {
            "role": role,
            "replica_id": replica_id,
            "block_size": self.model.block_size,
            "kv_cache_memory_bytes": self.model.kv_cache_memory_bytes,
            "num_kv_blocks": self.model.num_kv_blocks,
            "max_num_seqs": pool.max_num_seqs,
            "max_num_batched_tokens": pool.max_num_batched_tokens,
            "max_model_len": self.model.max_model_len,
            "default_ttl_s": self.cache.default_ttl_s,
            "max_ttl_s": self.cache.max_ttl_s,
            "local_prefill_threshold": self.cache.local_prefill_threshold if role == "decode" else 0,
            "export_lease_timeout_s": self.cache.export_lease_timeout_s,
            "dtype": self.model.dtype,
            "device": "cuda" if pool.num_gpus > 0 else "cpu",
            "attention_backend": self.model.attention_backend,
            "fused_kernels": self.model.fused_kernels,
            "prefill_attention": self.model.prefill_attention,
            "enforce_eager": self.model.enforce_eager,
            "num_threads": pool.torch_threads,
            # Wall clock, not monotonic: block expiries travel in KV events to the directory
            # actor, which compares them with its own time.time() (other process, other node).
            "clock": time.time,
        }

    def to_yaml(self) -> str:
        """Dump as YAML (round-trips through ``from_yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Config from an optional YAML file, then CLI overrides (dotted keys) on top."""
    cfg = ServeConfig.from_yaml(path) if path else ServeConfig()
    return cfg.with_overrides(overrides or {})
