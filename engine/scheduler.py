"""Continuous batching with chunked prefill, preemption by recompute, and remote prefill.

Each step gets a token budget (``max_num_batched_tokens``). Running requests are served
first, in admission order: a decoding request needs one token, a request mid-prefill
takes as much of its prompt as the budget leaves (chunked prefill). When blocks run out,
the most recently admitted running request is preempted: its blocks are freed and it
goes back to the head of the waiting queue to be recomputed later (its prefix usually
comes straight back from the prompt cache). Waiting requests are then admitted in
arrival order while budget, sequence slots and blocks last, each starting after its
cached prefix. Prefill chunks and decode tokens share one step.

A request whose cached prefix is partly in the host or disk tier reserves device blocks
for it and parks in ``WAITING_FOR_KV_PROMOTION`` while the blocks are copied back (other
requests keep running); it joins the running requests once they are all in place, or
goes back to the head of the queue if one could not be read (then it is a plain miss).

Decode role: a request flagged ``remote_prefill`` reserves blocks for its whole prompt
and parks in ``WAITING_FOR_REMOTE_KV`` with a :class:`RemotePrefillPlan`, unless fewer than
``local_prefill_threshold`` of its tokens are uncached, in which case it prefills here.
Host and disk hits count as cached: they are promoted while the prefill replica computes
the rest, and a request whose KV lands before its promotion is done waits for it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheManager, PrefixHit, PrefixState
from engine.outputs import RemotePrefillPlan
from engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Tokens of one request computed in this step."""

    request: Request
    # First position computed this step (== request.num_computed_tokens before the step).
    start: int
    # Number of tokens computed this step.
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, so a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What the model runner computes in one step."""

    # One-token chunks (decodes, and 1-token prefill tails); they lead the flat batch.
    decodes: list[ScheduledChunk] = field(default_factory=list)
    # Multi-token chunks (prefills), after the decodes.
    prefills: list[ScheduledChunk] = field(default_factory=list)
    # Requests preempted in this step (already back in the waiting queue).
    preempted: list[Request] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)


class Scheduler:
    """Decides, step by step, which tokens of which requests get computed."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.block_size = config.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Decode role: requests parked until their prompt KV lands, by id.
        self.remote_waiting: dict[str, Request] = {}
        # Requests parked until their cached prefix is promoted back to the device, by id.
        self.promoting: dict[str, Request] = {}
        self.pending_plans: list[RemotePrefillPlan] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote_waiting) + len(self.promoting)

    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens admitted or waiting but not yet computed (a load signal)."""
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        queued += sum(r.num_tokens - r.num_computed_tokens for r in self.promoting.values())
        queued += sum(
            r.num_tokens - r.num_computed_tokens - 1
            for r in self.running
            if r.num_computed_tokens < r.num_tokens - 1
        )
        return queued

    # ---------------------------------------------------------------- schedule
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        if self.promoting:
            self._resume_promoted(now)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                raise RuntimeError(f"running request {req.request_id} has nothing to compute")
            while not self.kv.allocate(req, n, now):
                victim = self.running.pop()
                self._preempt(victim, now)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledChunk(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
                continue
            break  # `req` itself was preempted: nothing after it is left running

        # Admit waiting requests unless this step already had to preempt.
        while not out.preempted and self.waiting and budget > 0 and self._has_seq_slot():
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req, now)
            num_cached = len(cached) * self.block_size
            if req.remote_prefill:
                if req.num_prompt_tokens - num_cached >= self.config.local_prefill_threshold:
                    if not self._park_for_remote_kv(req, cached, now):
                        break
                    continue
                req.remote_prefill = False
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate(req, n, now, cached):
                break
            self.waiting.popleft()
            req.hit_by_tier = self.kv.split_by_tier(cached)
            if self.kv.prefix_state(req) != PrefixState.READY:
                req.status = RequestStatus.WAITING_FOR_KV_PROMOTION
                self.promoting[req.request_id] = req
                continue
            self._record_admission(req, num_cached)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n

        for chunk in scheduled:
            (out.decodes if chunk.num_tokens == 1 else out.prefills).append(chunk)
        return out

    def _has_seq_slot(self) -> bool:
        busy = len(self.running) + len(self.remote_waiting) + len(self.promoting)
        return busy < self.config.max_num_seqs

    def _record_admission(self, req: Request, num_cached: int) -> None:
        if req.num_cached_tokens < 0:  # first admission, not a re-admission after preemption
            req.num_cached_tokens = num_cached
            req.cached_tokens_by_tier = req.hit_by_tier
            self.kv.record_lookup(req.num_tokens, req.hit_by_tier)

    def _resume_promoted(self, now: float) -> None:
        """Requests whose promoted prefix landed start running; failed ones start over."""
        for rid, req in list(self.promoting.items()):
            state = self.kv.prefix_state(req)
            if state == PrefixState.PENDING:
                continue
            del self.promoting[rid]
            if state == PrefixState.FAILED:
                self.kv.free(req, now)
                req.num_computed_tokens = 0
                req.remote_prefill = False  # recompute here (it may already have its first token)
                req.status = RequestStatus.WAITING
                self.waiting.appendleft(req)
                continue
            self._record_admission(req, req.num_computed_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _park_for_remote_kv(self, req: Request, cached: PrefixHit, now: float) -> bool:
        """Reserve blocks for the whole prompt and queue a remote-prefill plan."""
        num_cached = len(cached) * self.block_size
        if not self.kv.allocate(req, req.num_prompt_tokens - num_cached, now, cached):
            return False
        self.waiting.popleft()
        req.hit_by_tier = self.kv.split_by_tier(cached)
        self._record_admission(req, num_cached)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote_waiting[req.request_id] = req
        first = num_cached // self.block_size
        self.pending_plans.append(
            RemotePrefillPlan(
                request_id=req.request_id,
                prompt_token_ids=list(req.prompt_token_ids),
                params=req.params,
                first_block_index=first,
                block_ids=[b.block_id for b in req.blocks[first:]],
                num_local_cached_tokens=num_cached,
            )
        )
        return True

    # ----------------------------------------------------------- after a step
    def commit(self, out: SchedulerOutput, now: float) -> None:
        """Mark the step's tokens computed and publish newly full blocks to the cache."""
        for chunk in out.chunks:
            req = chunk.request
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_full_blocks(req, now)

    def finish(self, req: Request, status: RequestStatus, now: float, free_blocks: bool = True) -> None:
        """Take ``req`` out of every queue; free its blocks unless they are being exported."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.remote_waiting[req.request_id]
            self.pending_plans = [p for p in self.pending_plans if p.request_id != req.request_id]
        elif req.status == RequestStatus.WAITING_FOR_KV_PROMOTION:
            del self.promoting[req.request_id]
        req.status = status
        if free_blocks:
            self.kv.free(req, now)

    def _preempt(self, req: Request, now: float) -> None:
        self.kv.free(req, now)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ------------------------------------------------------- remote prefill
    def take_plans(self) -> list[RemotePrefillPlan]:
        plans, self.pending_plans = self.pending_plans, []
        return plans

    def complete_remote(self, req: Request, now: float) -> None:
        """The prompt's KV landed: the whole prompt counts as computed; resume decoding."""
        del self.remote_waiting[req.request_id]
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_full_blocks(req, now)
        if self.kv.prefix_state(req) != PrefixState.READY:  # its promoted prefix is still copying
            req.status = RequestStatus.WAITING_FOR_KV_PROMOTION
            self.promoting[req.request_id] = req
            return
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def fail_remote(self, req: Request, now: float) -> None:
        """The transfer failed: recompute the prompt here (cached prefix blocks survive)."""
        del self.remote_waiting[req.request_id]
        self.kv.free(req, now)
        req.num_computed_tokens = 0
        req.remote_prefill = False
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

