"""Engine configuration: one replica's cache, batching and role settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["mixed", "prefill", "decode"]

# KV budget when neither kv_cache_memory_bytes nor num_kv_blocks is given.
DEFAULT_KV_CACHE_MEMORY_BYTES = 1 << 30


@dataclass
class EngineConfig:
    """Everything ``LLMEngine`` needs beyond the model itself."""

    # "mixed" serves whole requests; "prefill" stops after the first token and exports KV;
    # "decode" admits requests whose prompt KV arrives from a prefill replica.
    role: Role = "mixed"
    # Stamped on KV event batches; the directory keys replicas by it.
    replica_id: str = "replica-0"
    # Tokens per KV block (also the prefix-cache granularity).
    block_size: int = 16
    # Memory for the paged KV cache, bytes; ignored when num_kv_blocks is set.
    kv_cache_memory_bytes: int | None = None
    # Exact number of KV blocks (overrides the memory budget).
    num_kv_blocks: int | None = None
    # Most requests running at once.
    max_num_seqs: int = 64
    # Per-step token budget: prefills longer than the leftover budget are chunked.
    max_num_batched_tokens: int = 512
    # Context limit; None = the model's own.
    max_model_len: int | None = None
    # Prompt-cache TTL of a block when the request asks for none, seconds.
    default_ttl_s: float = 300.0
    # Longest TTL a request may ask for, seconds.
    max_ttl_s: float = 3600.0
    # Decode role: prefill locally when fewer than this many prompt tokens are uncached.
    local_prefill_threshold: int = 0
    # Prefill role: exported blocks are released if the receiver never acknowledges.
    export_lease_timeout_s: float = 30.0
    # Weights/activations dtype ("float32", "float16", "bfloat16").
    dtype: str = "float32"
    # "cpu" or "cuda[:N]".
    device: str = "cpu"
    # "torch" (SDPA), "triton" or "flash_attn".
    attention_backend: str = "torch"
    # Never capture CUDA graphs; decode steps then always run eagerly. Graphs are used only
    # on CUDA with the "triton" backend, for decode-only steps that fit a captured batch.
    enforce_eager: bool = False
    # Largest decode batch captured as a CUDA graph (also capped by max_num_seqs and 256).
    cuda_graph_max_batch: int = 64
    # Fused Triton kernels for residual-add + RMSNorm and rotary embedding: "on" demands
    # them (CPU: only under TRITON_INTERPRET=1), "off" keeps the torch ops, "auto" is off
    # until a GPU run shows they pay off (see engine.model_runner.resolve_fused_kernels).
    fused_kernels: str = "auto"
    # Prefill attention of the "triton" backend: "triton" (the varlen paged kernel), "sdpa"
    # (torch SDPA for chunks with no cached prefix, the kernel for the rest) or "auto".
    prefill_attention: str = "auto"
    # torch intra-op threads for this engine; None leaves torch's default.
    num_threads: int | None = None
    # Where GGUF files are converted to; None = ~/.cache/kvferry (or $KVFERRY_CACHE_DIR).
    cache_dir: str | None = None
    # The engine's notion of "now", seconds; tests inject a fake clock.
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be mixed, prefill or decode, got {self.role!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.default_ttl_s <= 0 or self.max_ttl_s < self.default_ttl_s:
            raise ValueError("need 0 < default_ttl_s <= max_ttl_s")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be positive, got {self.cuda_graph_max_batch}")
        if self.fused_kernels not in ("auto", "on", "off"):
            raise ValueError(f"fused_kernels must be auto, on or off, got {self.fused_kernels!r}")
        if self.prefill_attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"prefill_attention must be auto, triton or sdpa, got {self.prefill_attention!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be at least 2")
