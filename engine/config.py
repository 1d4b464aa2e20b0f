"""Engine configuration: one pydantic model, validated once when it is built.

Every setting of one replica's engine (cache, batching, role, kernels) lives here, with
its default and its bounds, so nothing downstream re-checks them. What can only be
checked against the loaded model or the device (does the KV budget hold two blocks of
this model? can fused kernels launch here?) is checked where that is known.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["mixed", "prefill", "decode"]
Dtype = Literal["float32", "float16", "bfloat16"]
AttentionBackendName = Literal["torch", "triton", "flash_attn"]
FusedKernels = Literal["auto", "on", "off"]
PrefillAttention = Literal["auto", "triton", "sdpa"]
CpuLinear = Literal["auto", "onednn", "dense"]


class EngineConfig(BaseModel):
    """Everything ``LLMEngine`` needs beyond the model itself (and its clock)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(
        "mixed",
        description='"mixed" serves whole requests; "prefill" stops after the first token and exports '
        'its KV; "decode" admits requests whose prompt KV arrives from a prefill replica.',
    )
    replica_id: str = Field("replica-0", description="Stamped on KV event batches; the directory keys replicas by it.")
    block_size: int = Field(16, ge=1, description="Tokens per KV block (also the prefix-cache granularity); a power of two.")
    kv_cache_memory_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Memory for the paged KV cache, bytes; ignored when num_kv_blocks is set."
    )
    num_kv_blocks: int | None = Field(
        None, ge=2, description="Exact number of KV blocks; overrides kv_cache_memory_bytes. None: from the budget."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests running (or waiting for remote KV) at once.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Per-step token budget: prefills longer than the leftover budget are chunked."
    )
    max_model_len: int | None = Field(None, ge=1, description="Context limit (capped by the model's own); None = the model's.")
    default_ttl_s: float = Field(300.0, gt=0, description="Prompt-cache TTL of a block when the request asks for none, seconds.")
    max_ttl_s: float = Field(3600.0, gt=0, description="Longest prompt-cache TTL a request may ask for, seconds.")
    max_pinned_fraction: float = Field(
        0.5, ge=0, le=0.9, description="Most of the KV blocks explicit caches may pin at once (the rest stay "
        "for running requests); a pin over the cap is refused.",
    )
    device_ttl_s: float = Field(
        300.0,
        gt=0,
        description="Longest a cached block stays idle on the device before it is demoted to the host or "
        "disk tier (only when one is on: without a lower tier the device keeps a block its whole lifetime).",
    )
    host_kv_bytes: int = Field(
        0, ge=0, description="Host-memory KV tier, bytes (pinned on CUDA); 0 turns the host tier off."
    )
    host_ttl_s: float = Field(
        3600.0, gt=0, description="Longest a block stays in the host tier after its last use, seconds."
    )
    disk_kv_dir: str | None = Field(
        None,
        description="Directory of the disk KV tier (block files, shared safely by several engines); "
        "None turns the disk tier off.",
    )
    disk_kv_bytes: int = Field(
        16 << 30, gt=0, description="Most bytes of block files under disk_kv_dir (all engines sharing it together)."
    )
    disk_ttl_s: float = Field(
        86400.0, gt=0, description="Longest a block stays in the disk tier after its last use, seconds."
    )
    local_prefill_threshold: int = Field(
        64,
        ge=0,
        description="Decode role only: prefill locally when fewer than this many prompt tokens are "
        "uncached (0 sends every prompt to a prefill replica).",
    )
    export_lease_timeout_s: float = Field(
        30.0, gt=0, description="Prefill role: exported blocks are released when the receiver never releases them."
    )
    dtype: Dtype = Field("float32", description="Weights, activations and KV cache dtype.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$", description='"cpu", "cuda" or "cuda:N".')
    attention_backend: AttentionBackendName = Field(
        "torch", description='"torch" (SDPA, any device), "triton" (Triton kernels) or "flash_attn" (CUDA, optional package).'
    )
    enforce_eager: bool = Field(
        False,
        description="Never capture CUDA graphs. Graphs are used only on CUDA with the triton backend, "
        "for decode-only steps that fit a captured batch.",
    )
    cuda_graph_max_batch: int = Field(
        64, ge=1, description="Largest decode batch captured as a CUDA graph (also capped by max_num_seqs and 256)."
    )
    fused_kernels: FusedKernels = Field(
        "auto",
        description='Fused Triton residual-add + RMSNorm and rotary kernels: "on" demands them (CPU: only '
        'under TRITON_INTERPRET=1), "off" keeps the torch ops, "auto" is off until a GPU run shows they '
        "pay off (engine.model_runner.resolve_fused_kernels).",
    )
    prefill_attention: PrefillAttention = Field(
        "auto",
        description='Prefill path of the triton backend: "triton" (the varlen paged kernel), "sdpa" (torch '
        'SDPA for chunks with no cached prefix, the kernel for the rest) or "auto" (sdpa on CUDA).',
    )
    cpu_linear: CpuLinear = Field(
        "auto",
        description='How linear layers multiply on CPU: "onednn" (weights packed once for oneDNN), "dense" '
        '(F.linear on the checkpoint layout) or "auto" (times both, and MKL on a transposed layout, on the '
        "model's shapes at load and picks per shape; logged). Ignored on CUDA.",
    )
    compile: bool = Field(
        False,
        description="CPU: run the model forward through torch.compile (inductor; attention and oneDNN "
        "linears stay opaque ops). The first steps pay the compile (logged; cached on disk). Needs a C++ compiler.",
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads for this engine; None leaves torch's default.")
    cache_dir: str | None = Field(
        None, description="Where GGUF files are converted to; None = ~/.cache/kvferry (or $KVFERRY_CACHE_DIR)."
    )

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_options(cls, data: Any) -> Any:
        # extra="forbid" alone says only "extra inputs are not permitted"; a caller who
        # misspelt an option wants to see what it could have been.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                hints = {u: difflib.get_close_matches(u, cls.model_fields, n=1) for u in unknown}
                guesses = "".join(f" ({u!r}: did you mean {h[0]!r}?)" for u, h in hints.items() if h)
                raise ValueError(f"unknown engine option(s) {unknown}{guesses}; valid: {sorted(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _cross_field_rules(self) -> EngineConfig:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(f"default_ttl_s ({self.default_ttl_s:g}) must not exceed max_ttl_s ({self.max_ttl_s:g})")
        return self
