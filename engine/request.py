"""One request's state inside the engine, and its lifecycle states."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.block_hash import BlockHash
from engine.detokenizer import StopChecker
from engine.outputs import TokensByTier
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.block_pool import KVBlock


class RequestStatus(enum.Enum):
    """Lifecycle: WAITING -> RUNNING -> FINISHED_*. Preemption frees a running request's
    blocks and puts it back to WAITING, at the head of the queue, to be recomputed.
    Decode role: WAITING -> WAITING_FOR_REMOTE_KV -> RUNNING (or back to WAITING on failure).
    A prefix hit in the host or disk tier: WAITING -> WAITING_FOR_KV_PROMOTION -> RUNNING
    once its blocks are back on the device (or back to WAITING if one could not be read)."""

    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    WAITING_FOR_KV_PROMOTION = "waiting_for_kv_promotion"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    # Something failed while serving this request alone (see Request.error); the others go on.
    FINISHED_ERROR = "finished_error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """Tokens, progress and KV blocks of one request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Effective prompt-cache TTL (the request's ask, or the engine default).
    ttl_s: float
    # This request's text so far, its stop strings, and how much text was handed out.
    stop_checker: StopChecker
    status: RequestStatus = RequestStatus.WAITING
    # Generated tokens.
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt + output; the model has computed KV for the first num_computed_tokens of it.
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from the prompt cache at first admission (-1: not admitted yet).
    num_cached_tokens: int = -1
    # The same, split by the tier the blocks were found in.
    cached_tokens_by_tier: TokensByTier = field(default_factory=TokensByTier)
    # Split of the latest prefix hit taken (becomes cached_tokens_by_tier at first admission).
    hit_by_tier: TokensByTier = field(default_factory=TokensByTier)
    # KV blocks in order; block i holds tokens [i * block_size, (i + 1) * block_size).
    blocks: list[KVBlock] = field(default_factory=list)
    # Chained hashes of the full blocks of all_token_ids computed so far (lazily extended).
    block_hashes: list[BlockHash] = field(default_factory=list)
    # How many of `blocks` already carry a prefix-cache hash.
    num_cached_blocks: int = 0
    # Decode role: ask a prefill replica for the prompt's KV.
    remote_prefill: bool = False
    # Prefill role: export blocks from this index when the prompt is done.
    export_from_block: int | None = None
    # Output tokens already handed out in a RequestOutput's new_token_ids.
    num_emitted_tokens: int = 0
    # Why the request failed (status FINISHED_ERROR): a message for the client, no trace.
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def block_ttl_s(self, index: int, block_size: int) -> float:
        """Prompt-cache TTL of this request's block ``index``: the longest of the default and
        of every breakpoint whose prefix covers the whole block."""
        end = (index + 1) * block_size
        ttl = self.ttl_s
        for bp in self.params.cache_breakpoints:
            if bp.num_tokens >= end and bp.ttl_s > ttl:
                ttl = bp.ttl_s
        return ttl

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
