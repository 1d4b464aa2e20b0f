"""Result objects the engine hands to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass
class KVExport:
    """Prefill role: blocks of a finished prompt, leased until ``kv_transfer.release_export``."""

    # This engine's block ids holding block indices first_block_index.. of the prompt.
    block_ids: list[int]
    # Index (in the prompt's block list) of block_ids[0].
    first_block_index: int
    # Prompt tokens whose KV the blocks hold (the last block may be partial).
    num_tokens: int


@dataclass
class RemotePrefillPlan:
    """Decode role: a request waiting for its prompt KV from a prefill replica."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Blocks before this index are already cached here and need not travel.
    first_block_index: int
    # This engine's blocks that receive block indices first_block_index.. (last may be partial).
    block_ids: list[int]
    # Prompt tokens already cached locally.
    num_local_cached_tokens: int


@dataclass(frozen=True)
class TokensByTier:
    """A token count split by the KV tier the tokens came from."""

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host + self.disk

    def __add__(self, other: TokensByTier) -> TokensByTier:
        return TokensByTier(self.device + other.device, self.host + other.host, self.disk + other.disk)


@dataclass
class TierStats:
    """The host and disk KV tiers of one engine: sizes now, and cumulative counters."""

    host_capacity_blocks: int = 0
    # Blocks the host tier holds; rows still read by in-flight promotions.
    host_blocks: int = 0
    host_busy_blocks: int = 0
    disk_capacity_bytes: int = 0
    # Blocks (and their file bytes) this engine holds in the disk tier.
    disk_blocks: int = 0
    disk_bytes: int = 0
    # Bytes of one KV block (all layers) in host memory.
    block_bytes: int = 0
    # Blocks moved into the host / disk tier (demotions) and back to the device (promotions).
    num_demoted_to_host: int = 0
    num_demoted_to_disk: int = 0
    num_promoted_from_host: int = 0
    num_promoted_from_disk: int = 0
    # Promoted blocks whose KV could not be read back (a corrupt or vanished file): a miss.
    num_failed_promotions: int = 0
    # Blocks leaving the host / disk tier at their TTL there, or for room before it.
    num_host_expired: int = 0
    num_host_evicted: int = 0
    num_disk_expired: int = 0
    num_disk_evicted: int = 0
    # Latest promotion latencies (seconds from launch to KV in place), and how many ever.
    recent_promote_seconds: tuple[float, ...] = ()
    num_promotions: int = 0


@dataclass
class RequestOutput:
    """A request's progress after a step (cumulative plus this step's delta)."""

    request_id: str
    prompt_token_ids: list[int]
    # Every generated token so far.
    token_ids: list[int]
    # Tokens generated in this step.
    new_token_ids: list[int]
    # All generated text so far (stop strings trimmed).
    text: str
    # Text added since the previous output of this request.
    new_text: str
    finished: bool
    # "stop", "length", "abort", "error" or None while running.
    finish_reason: str | None
    num_prompt_tokens: int
    # Prompt tokens served from the prompt cache instead of computed.
    num_cached_tokens: int
    # num_cached_tokens split by the tier the blocks were found in (device, host, disk).
    cached_tokens_by_tier: TokensByTier = field(default_factory=TokensByTier)
    # Prefill role: the leased blocks to ship (final output only).
    kv_export: KVExport | None = None
    # finish_reason "error": what failed for this request alone (a message, never a trace).
    error: str | None = None
    # finish_reason "stop" on a stop string: which one (None for an end-of-sequence token).
    stop_string: str | None = None


@dataclass
class EngineStats:
    """A load snapshot for routers and metrics."""

    num_running: int = 0
    # Queued, or waiting for their cached prefix to come back from the host or disk tier.
    num_waiting: int = 0
    num_waiting_for_remote_kv: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    # Free blocks still holding a reusable cached prefix (a subset of num_free_blocks).
    num_cached_blocks: int = 0
    # The scheduler's cap on running sequences (utilisation = num_running / max_num_seqs).
    max_num_seqs: int = 0
    # Fraction of blocks held by requests (cached-but-free blocks count as free).
    kv_usage: float = 0.0
    # Prompt tokens admitted or waiting but not yet computed.
    num_queued_prefill_tokens: int = 0
    # Cumulative prefix-cache lookups and hits, in tokens (vLLM-compatible counters).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Cumulative preemptions (recompute) since start.
    num_preemptions: int = 0
    # Cumulative cached blocks dropped at their TTL / evicted for room before it.
    num_expired_blocks: int = 0
    num_evicted_blocks: int = 0
    # Explicit caches (engine.pins): pins held, the blocks and prompt tokens they hold
    # (blocks count as used in kv_usage), and pins ended at their expiry (cumulative).
    num_pins: int = 0
    num_pinned_blocks: int = 0
    num_pinned_tokens: int = 0
    num_expired_pins: int = 0
    # Bytes of one KV block (all layers, keys and values).
    kv_block_bytes: int = 0
    # Cumulative prefix-cache hits split by tier (sums to prefix_cache_hits).
    prefix_cache_hits_by_tier: TokensByTier = field(default_factory=TokensByTier)
    # Host and disk tiers (all zero when the engine has none).
    tiers: TierStats = field(default_factory=TierStats)
