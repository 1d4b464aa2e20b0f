"""The engine's side of disaggregated serving: KV export leases and remote-KV landings.

``LLMEngine.kv_transfer`` is one :class:`KVTransfer`. It never moves bytes between
machines (that is the caller's transport); it decides which blocks may be read or
written, and when, and it keeps the engine's books straight while bytes are in flight.
Like the rest of the engine it is not thread-safe: call it from the engine's thread.

Contract, in the spirit of vLLM's KV connector interface (who calls what, in which order):

**Prefill role** (``role="prefill"``), the sender:

1. The caller adds the request with ``add_request(..., export_from_block=k)`` and steps
   the engine. After its first token the request finishes and its final
   ``RequestOutput.kv_export`` is a :class:`~engine.outputs.KVExport`: the engine's blocks
   holding the prompt's block indices ``k..`` (the last one possibly partial).
2. From then on the engine guarantees those blocks are *leased*: no other request
   writes them until ``release_export(request_id)`` is called, or until the lease is
   older than ``export_lease_timeout_s`` (``step()`` then releases it: a receiver that
   vanished cannot pin memory forever). Aborting the request releases it too.
3. The caller packs them with ``read_blocks(block_ids)`` (one contiguous buffer),
   ships the buffer, then calls ``release_export(request_id)`` whether the send worked
   or not. Released blocks stay in the prompt cache. Reading after the release (or
   after the timeout) reads whatever the blocks hold by then.

**Decode role** (``role="decode"``), the receiver:

1. The caller adds the request with ``add_request(..., remote_prefill=True)``. When the
   scheduler admits it, it reserves blocks for the whole prompt (after the locally
   cached prefix) and the request waits in ``WAITING_FOR_REMOTE_KV``, unless fewer than
   ``local_prefill_threshold`` tokens are uncached (then it is simply prefilled here).
2. After each ``step()`` the caller drains ``take_plans()``: one
   :class:`~engine.outputs.RemotePrefillPlan` per newly waiting request, naming the
   blocks to fill (``block_ids``) and the prompt block they start at
   (``first_block_index``). ``block_shape()`` and ``LLMEngine.kv_dtype`` size the buffer.
3. When the buffer arrives the caller checks ``is_waiting(request_id)`` *right before*
   ``write_blocks(plan.block_ids, buffer)``: a request aborted meanwhile has freed its
   blocks, which may already belong to another request, so writing would corrupt it.
   Then ``complete(request_id, first_token_id, num_cached_tokens)``: the prompt counts
   as computed, the sender's first token is appended, and the request's output comes
   out of the next ``step()``.
4. On any failure (no prefill replica, transfer error, timeout) the caller calls
   ``fail(request_id)``: the request goes back to the head of the waiting queue and is
   prefilled locally, with the same tokens as a remote prefill would have given.

``complete`` and ``fail`` of a request that no longer waits (aborted, or already
completed or failed) are ignored, so a late or duplicate answer is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.outputs import KVExport, RemotePrefillPlan, TokensByTier
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler

# The engine's handling of a token it did not sample itself: append it, check stop
# conditions, queue the request's output (the same path as a sampled token).
FirstTokenHandler = Callable[[Request, int, float], None]


class KVTransfer:
    """Export leases (prefill role) and remote-KV landings (decode role) of one engine."""

    def __init__(
        self,
        scheduler: Scheduler,
        kv: KVCacheManager,
        runner: ModelRunner,
        *,
        clock: Callable[[], float],
        lease_timeout_s: float,
        on_first_token: FirstTokenHandler,
    ) -> None:
        self._scheduler = scheduler
        self._kv = kv
        self._runner = runner
        self._clock = clock
        self._lease_timeout_s = lease_timeout_s
        self._on_first_token = on_first_token
        # Prefill role: finished requests whose blocks are leased to a receiver, with the
        # lease's start (engine clock), in lease order.
        self._leases: dict[str, tuple[Request, float]] = {}

    # ------------------------------------------------------------ prefill role
    def start_export(self, req: Request, status: RequestStatus, now: float) -> None:
        """Finish ``req`` (its job ends with the first token) and lease its blocks out."""
        self._scheduler.finish(req, status, now, free_blocks=False)
        self._leases[req.request_id] = (req, now)

    def export_of(self, request_id: str) -> KVExport | None:
        """The leased blocks of ``request_id``, or None when it holds no lease."""
        entry = self._leases.get(request_id)
        if entry is None:
            return None
        req = entry[0]
        first = req.export_from_block or 0
        return KVExport([b.block_id for b in req.blocks[first:]], first, req.num_prompt_tokens)

    def has_export(self, request_id: str) -> bool:
        return request_id in self._leases

    def release_export(self, request_id: str) -> None:
        """The receiver has the blocks (or gave up): end the lease; the blocks stay cached."""
        entry = self._leases.pop(request_id, None)
        if entry is not None:
            self._kv.free(entry[0], self._clock())

    def expire_leases(self, now: float) -> None:
        """Release leases older than ``export_lease_timeout_s`` (called by ``step()``)."""
        expired = [rid for rid, (_, start) in self._leases.items() if now - start > self._lease_timeout_s]
        for rid in expired:
            self.release_export(rid)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """(L, 2, n, block_size, H_kv, D) contiguous copy of ``block_ids``."""
        self._check_block_ids(block_ids)
        return self._runner.read_blocks(list(block_ids))

    # ------------------------------------------------------------- decode role
    def take_plans(self) -> list[RemotePrefillPlan]:
        """Requests that started waiting for prompt KV since the last call."""
        return self._scheduler.take_plans()

    def block_shape(self) -> tuple[int, ...]:
        """(num_layers, 2, block_size, H_kv, D) of one block across all layers."""
        num_layers, two, _, block_size, num_kv_heads, head_dim = self._runner.kv_cache.shape
        return (num_layers, two, block_size, num_kv_heads, head_dim)

    def write_blocks(self, block_ids: Sequence[int], buffer: torch.Tensor) -> None:
        """Write a buffer from another engine's :meth:`read_blocks` into ``block_ids``."""
        self._check_block_ids(block_ids)
        num_layers, two, block_size, num_kv_heads, head_dim = self.block_shape()
        expected = (num_layers, two, len(block_ids), block_size, num_kv_heads, head_dim)
        if tuple(buffer.shape) != expected:
            raise ValueError(f"KV buffer shape {tuple(buffer.shape)} != expected {expected}")
        self._runner.write_blocks(list(block_ids), buffer)

    def is_waiting(self, request_id: str) -> bool:
        """True while ``request_id`` still owns its reserved blocks and awaits its KV."""
        return request_id in self._scheduler.remote_waiting

    def complete(
        self,
        request_id: str,
        first_token_id: int,
        num_cached_tokens: int | None = None,
        cached_tokens_by_tier: TokensByTier | None = None,
    ) -> None:
        """The prompt KV landed: resume decoding after the sender's first token.

        ``num_cached_tokens`` (the sender's prompt-cache hit) replaces this replica's own
        count in the request's outputs when given, and ``cached_tokens_by_tier`` its split
        (without one, the tokens count as device hits). Ignored when the request no longer waits.
        """
        req = self._scheduler.remote_waiting.get(request_id)
        if req is None:
            return  # aborted meanwhile, or answered twice
        now = self._clock()
        self._scheduler.complete_remote(req, now)
        if num_cached_tokens is not None:
            req.num_cached_tokens = num_cached_tokens
            split = cached_tokens_by_tier or TokensByTier(device=num_cached_tokens)
            req.cached_tokens_by_tier = split if split.total == num_cached_tokens else TokensByTier(num_cached_tokens)
        self._on_first_token(req, int(first_token_id), now)

    def fail(self, request_id: str) -> None:
        """The transfer failed: prefill the prompt here instead. Ignored when it no longer waits."""
        req = self._scheduler.remote_waiting.get(request_id)
        if req is not None:
            self._scheduler.fail_remote(req, self._clock())

    # -------------------------------------------------------------- internals
    def _check_block_ids(self, block_ids: Sequence[int]) -> None:
        n = self._kv.pool.num_blocks
        if any(not 0 <= b < n for b in block_ids):
            raise ValueError(f"block ids must be in [0, {n})")
