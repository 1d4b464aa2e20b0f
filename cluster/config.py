"""Serving configuration: one pydantic model, loadable from YAML and overridable by CLI flags.

One ``ServeConfig`` describes a whole deployment: the served model, the engine settings
(``engine``: ``engine.EngineConfig`` itself, embedded, so every engine setting has one
default and one validation), the pools (prefill and decode, or one ``mixed`` pool for
colocated serving) each with its Ray resources and optional per-pool ``engine``
overrides, the prompt-cache tenancy, the transport, the HTTP front, prefill-pool
failover and the routing policy. Every model forbids unknown keys, so a typo in a YAML
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

from engine.config import EngineConfig
from router.policy import DEFAULT_PREFILL_TOKENS_PER_S, DISK_PROMOTE_US_PER_TOKEN, HOST_PROMOTE_US_PER_TOKEN

Role = Literal["prefill", "decode", "mixed"]
# Engine settings each replica gets from its pool and its place, never from the file.
PER_REPLICA_ENGINE_KEYS = ("role", "replica_id", "device", "num_threads")


class _Strict(BaseModel):
    """Base: unknown keys are an error (a misspelt YAML key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingConfig(_Strict):
    """Serve autoscaling of one pool (used when the pool's ``num_replicas`` is ``"auto"``).

    Serve adds a replica when the pool's ongoing requests per replica stay above
    ``target_ongoing_requests`` for ``upscale_delay_s`` and removes one when they stay below
    for ``downscale_delay_s``. The defaults react faster than Serve's (30 s / 600 s): an LLM
    pool's load swings with traffic, and a replica's cost is the accelerator it holds.
    """

    min_replicas: int = Field(1, ge=1, description="Fewest replicas (the pool never scales to zero).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=1, description="Replicas at deploy time (default: min_replicas).")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Requests in flight per replica the pool aims for (decode: running streams)."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay above target this long to add a replica.")
    downscale_delay_s: float = Field(
        60.0, ge=0, description="Load must stay below target this long to remove a replica."
    )
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report their load to Serve.")
    look_back_period_s: float = Field(10.0, gt=0, description="Window the reported load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config`` for this pool."""
        return self.model_dump(exclude_none=True)


class PoolConfig(_Strict):
    """One pool of identical replicas (the prefill pool, the decode pool or a mixed pool)."""

    num_replicas: int | Literal["auto"] = Field(
        1,
        description='Fixed number of replicas (0 disables the pool), or "auto": Serve scales it per `autoscaling`.',
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description='Autoscaling bounds and targets (only when num_replicas is "auto").'
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels a replica must run on (label_selector); pins a pool to its KubeRay worker group.",
    )
    num_cpus: float = Field(0.5, gt=0, description="Ray logical CPUs reserved per replica (fractional is fine on CPU).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; > 0 runs the engine on CUDA.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads in each replica (the engine's num_threads).")
    max_ongoing_requests: int = Field(64, ge=1, description="Ray Serve's cap on requests in flight per replica.")
    max_queued_requests: int = Field(
        128, ge=-1,
        description="Requests waiting for a free replica of this pool (all replicas at max_ongoing_requests); "
        "beyond it clients get 503 with Retry-After at once instead of a timeout. -1: no limit.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray custom resources per replica (pins a pool to labelled nodes on KubeRay).",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the top-level `engine` settings for this pool only (same keys).",
    )

    @model_validator(mode="after")
    def _replicas(self) -> PoolConfig:
        if isinstance(self.num_replicas, int) and self.num_replicas < 0:
            raise ValueError("num_replicas must be >= 0 or \"auto\"")
        return self

    @property
    def autoscaled(self) -> bool:
        """Whether Serve sizes this pool (``num_replicas: auto``)."""
        return self.num_replicas == "auto"

    @property
    def min_replicas(self) -> int:
        """Replicas the pool has at least: its fixed size, or its autoscaling floor."""
        return self.autoscaling.min_replicas if self.num_replicas == "auto" else int(self.num_replicas)

    @property
    def max_replicas(self) -> int:
        """Replicas the pool has at most: its fixed size, or its autoscaling ceiling."""
        return self.autoscaling.max_replicas if self.num_replicas == "auto" else int(self.num_replicas)


class ServedModelConfig(_Strict):
    """Which model to serve, under which name."""

    model: str = Field(
        "default", description='HF model directory, a .gguf file, or "default" (embedded SmolLM2-135M-Instruct).'
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model`; defaults to the engine's model id."
    )
    default_max_tokens: int = Field(
        256, ge=1, description="Tokens generated when a request sets no max_tokens (capped by the context)."
    )


class CacheConfig(_Strict):
    """Who may hit whose prompt cache (the TTLs are engine settings: `engine.default_ttl_s`...),
    and the explicit caches (Gemini `cachedContents`) each API key may pin."""

    tenant_isolation: Literal["api_key", "none"] = Field(
        "api_key",
        description=(
            "api_key: cached blocks are salted with a hash of the request's API key, so tenants "
            "never hit (or time) each other's prompt cache; requests without a key share one "
            "anonymous tenant. none: every request shares one cache."
        ),
    )
    explicit_cache_budget_tokens: int = Field(
        65_536, ge=0, description="Most prompt tokens one API key's explicit caches may pin at once (else a 429).")
    explicit_cache_default_ttl_s: float = Field(3600.0, gt=0, description="Explicit-cache lifetime if none is asked, s.")
    explicit_cache_max_ttl_s: float = Field(604_800.0, gt=0, description="Longest explicit-cache lifetime, s (else 400).")
    min_cacheable_tokens: int = Field(
        0,
        ge=0,
        description=(
            "Shortest prefix a cache breakpoint (Anthropic cache_control) may cache, in tokens: a "
            "breakpoint before it gets no TTL of its own and reports no cache write. 0: any "
            "breakpoint that covers at least one full KV block."
        ),
    )


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


class GrpcConfig(_Strict):
    """The gRPC front (Serve's gRPC proxy, next to HTTP): ``kvferry.v1.Inference``, docs/grpc.md."""

    port: int = Field(
        9000, ge=0, le=65535,
        description="Port of Serve's gRPC proxy (service kvferry.v1.Inference, reflection on); 0 turns gRPC off.",
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


class AuthConfig(_Strict):
    """Optional API keys (``cluster.auth``). The keys themselves never go in this file."""

    api_keys_file: str | None = Field(
        None, description="File with one API key per line (# comments); every request then needs one of them."
    )
    api_keys_env: str | None = Field(
        "KVFERRY_API_KEYS",
        description="Environment variable (of the ingress replicas) holding comma-separated API keys; unset = none.",
    )


class MetricsConfig(_Strict):
    """Where Prometheus scrapes kvferry (Ray exports every replica's metrics on each node)."""

    export_port: int = Field(
        8080, ge=0, le=65535,
        description="Ray's metrics export port for `kvferry serve` (0: Ray picks one). On KubeRay the pods set it.",
    )


class RoutingConfig(_Strict):
    """kvferry's cache-affinity RequestRouters (``router.policy``'s knobs)."""

    request_router: Literal["kvferry", "default"] = Field(
        "kvferry",
        description="kvferry: cache-affinity routing (directory + load); default: Serve's power-of-two choices.",
    )
    uncached_weight: float = Field(
        1.0, ge=0, description="Prefill pool: weight of a request's own uncached tokens against the queue ahead."
    )
    imbalance_ratio: float = Field(
        2.0, ge=1, description="Prefill pool: a queue longer than ratio x the shortest (+ imbalance_abs_tokens) is demoted."
    )
    imbalance_abs_tokens: int = Field(32_768, ge=0, description="Prefill pool: absolute slack of that valve, tokens.")
    affinity_weight: float = Field(
        0.5, ge=0, le=1, description="Decode pool: what a fully cached conversation is worth, in units of load."
    )
    imbalance_load: float = Field(
        0.5, ge=0, description="Decode pool: replicas this much load above the least loaded are demoted."
    )
    host_promote_us_per_token: float = Field(
        HOST_PROMOTE_US_PER_TOKEN, ge=0,
        description="Time to promote one cached token's KV from host memory to the device, microseconds "
        "(benchmarks/promote_cost.py; the default was measured on CPU): a host hit saves its recompute minus this.",
    )
    disk_promote_us_per_token: float = Field(
        DISK_PROMOTE_US_PER_TOKEN, ge=0,
        description="The same from the disk tier, microseconds per token.",
    )
    prefill_tokens_per_s: float = Field(
        DEFAULT_PREFILL_TOKENS_PER_S, gt=0,
        description="A replica's prefill speed, to weigh promote time against recompute (measured with the promote costs).",
    )
    lookup_timeout_s: float = Field(
        0.25, gt=0, description="The KV directory must answer within this; else power-of-two choices."
    )
    speculative_ttl_s: float = Field(
        10.0, gt=0, description="How long a router remembers where it sent a prefix before the directory knows."
    )
    stats_period_s: float = Field(1.0, gt=0, description="How often Serve refreshes each replica's load snapshot.")


class ServeConfig(_Strict):
    """The whole serving application."""

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: prefill + decode pools; colocated: one pool of `mixed` replicas.",
    )
    model: ServedModelConfig = Field(default_factory=ServedModelConfig, description="The served model.")
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine settings of every replica (pools may override keys)."
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Prompt-cache tenancy.")
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
    grpc: GrpcConfig = Field(default_factory=GrpcConfig, description="gRPC front (0 turns it off).")
    failover: FailoverConfig = Field(
        default_factory=FailoverConfig, description="Prefill-pool outage detection (local prefill meanwhile)."
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Request routing between replicas.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics export.")
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="API keys: off unless a key file or the key variable gives keys."
    )
    app_name: str = Field("kvferry", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")

    @model_validator(mode="after")
    def _engines_resolve(self) -> ServeConfig:
        """Every pool's engine settings validate now, not when a replica starts."""
        defaults = EngineConfig()
        for key in PER_REPLICA_ENGINE_KEYS:
            if getattr(self.engine, key) != getattr(defaults, key):
                raise ValueError(f"engine.{key} is set per replica from its pool; remove it from `engine`")
        for role in ("prefill", "decode", "mixed"):
            bad = sorted(set(self.pool(role).engine) & set(PER_REPLICA_ENGINE_KEYS))
            if bad:
                raise ValueError(f"{role}.engine: {bad} are set per replica; remove them")
            self.engine_config(role, f"{role}-check")
        return self

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

    def engine_config(self, role: str, replica_id: str) -> EngineConfig:
        """The engine settings of one replica: ``engine``, its pool's overrides, its place."""
        pool = self.pool(role)
        return EngineConfig.model_validate({
            **self.engine.model_dump(),
            **pool.engine,
            "role": role,
            "replica_id": replica_id,
            "device": "cuda" if pool.num_gpus > 0 else "cpu",
            "num_threads": pool.torch_threads,
        })

    @property
    def front_role(self) -> Role:
        """The pool the ingress sends requests to."""
        return "decode" if self.mode == "disaggregated" else "mixed"

    def to_yaml(self) -> str:
        """Dump as YAML (round-trips through ``from_yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Wall clock, not monotonic, for serving engines: block expiries travel in KV events to the
# directory actor, which compares them with its own time.time() (other process, other node).
SERVING_CLOCK = time.time


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Config from an optional YAML file, then CLI overrides (dotted keys) on top."""
    cfg = ServeConfig.from_yaml(path) if path else ServeConfig()
    return cfg.with_overrides(overrides or {})
