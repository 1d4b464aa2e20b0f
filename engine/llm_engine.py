"""``LLMEngine``: one replica's engine (model, paged KV, prompt cache, scheduler).

The step, nano-vllm style: schedule -> run the model -> commit and sample -> outputs.
The incremental API (``add_request`` / ``step`` / ``abort``) is what servers drive;
``generate`` wraps it for offline use. KV transfer for disaggregated serving (prefill and
decode roles) is ``LLMEngine.kv_transfer`` (``engine.kv_transfer``). See
docs/engine-api.md for the full contract.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.intake import make_request
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import CacheSnapshot, KVEventBatch, Tier
from engine.kv_tiers.build import build_tiers, tier_lifetimes
from engine.kv_transfer import KVTransfer
from engine.model_runner import ModelRunner, num_kv_blocks
from engine.models import resolve_dtype
from engine.output_processor import make_error_output, make_output, stop_status
from engine.outputs import EngineStats, RequestOutput, TierStats
from engine.pins import PinTable
from engine.request import Request, RequestStatus
from engine.sampler import SamplingFailure
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import PromptTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# A forward pass that fails this many steps in a row means the engine itself is broken
# (e.g. a CUDA error that poisons the context): step() raises and the replica is replaced.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class LLMEngine:
    """Serves requests on one model replica; not thread-safe (drive it from one thread)."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: Any,
        tokenizer: Any | None,
        config: EngineConfig,
        model_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_id = model_id
        # The engine's "now", seconds: tests pass a fake clock; servers may pass wall time
        # so that block expiries in KV events compare across processes.
        self.clock = clock
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or model_config.max_model_len, model_config.max_model_len)
        self.eos_token_ids = frozenset(model_config.eos_token_ids or [])
        self.kv_dtype = resolve_dtype(config.dtype)
        self.device = torch.device(config.device)

        num_blocks = num_kv_blocks(config, model_config, self.kv_dtype)
        self.pool = BlockPool(num_blocks, ttl_cap_s=tier_lifetimes(config).cap(Tier.DEVICE))
        self.kv = KVCacheManager(self.pool, config.block_size, model_id)
        self.scheduler = Scheduler(config, self.kv)
        # Explicit caches: prompt prefixes held until their expiry (engine.pins).
        self.pins = PinTable(self.pool, int(num_blocks * config.max_pinned_fraction))
        self.runner = self._build_runner(model, model_config, num_blocks)
        # Host and disk tiers behind the device pool (engine.kv_tiers); None when off.
        self.tiers = self.kv.tiers = build_tiers(config, self.pool, self.runner.kv_cache, model, model_id, clock())
        self.kv_transfer = KVTransfer(
            self.scheduler,
            self.kv,
            self.runner,
            clock=clock,
            lease_timeout_s=config.export_lease_timeout_s,
            on_first_token=self._resume_after_remote_prefill,
        )
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._event_seq_no = 0
        self._ids = itertools.count()
        self._consecutive_step_failures = 0
        self._prompt_tokenizer: PromptTokenizer | None = None

    def _build_runner(self, model: torch.nn.Module, model_config: Any, num_blocks: int) -> ModelRunner:
        """The model runner over this engine's KV pool and settings."""
        return ModelRunner(
            model,
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            dtype=self.kv_dtype,
            device=self.device,
            attention_backend=self.config.attention_backend,
            max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            enforce_eager=self.config.enforce_eager,
            cuda_graph_max_batch=self.config.cuda_graph_max_batch,
            fused_kernels=self.config.fused_kernels,
            prefill_attention=self.config.prefill_attention,
            cpu_linear=self.config.cpu_linear,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            compile_model=self.config.compile,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "default",
        *,
        config: EngineConfig | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> LLMEngine:
        """Load ``model`` (HF dir, .gguf file or "default") with an ``EngineConfig``.

        Pass a whole ``config``, or ``EngineConfig`` fields as keyword ``options`` (applied on
        top of ``config`` when both are given). A misspelt option raises a ``ValueError``
        naming the valid ones.
        """
        # Imported here: the loader pulls in transformers and gguf, which only loading needs.
        from engine.loader import load_model, resolve_model_path, served_model_name  # noqa: PLC0415

        if config is None or options:
            config = EngineConfig.model_validate({**(config.model_dump() if config else {}), **options})
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        path = resolve_model_path(str(model), cache_dir=cache_dir)
        net, model_config = load_model(path, dtype=config.dtype, device=config.device)
        try:
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError):
            tokenizer = None  # token-id prompts still work; text prompts raise a clear error
        model_id = served_model_name(str(model))
        return cls(net, model_config, tokenizer, config, model_id, clock=clock or time.monotonic)

    # ---------------------------------------------------------------- tokens
    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """The one tokenization path (also used by the serving ingress)."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_id!r} has no tokenizer: send token ids instead of text")
        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = PromptTokenizer(self.tokenizer, self.max_model_len)
        return self._prompt_tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (refused from its length alone when it cannot fit)."""
        return self.prompt_tokenizer.encode_text(text)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template."""
        return self.prompt_tokenizer.encode_chat(messages, add_generation_prompt)

    # -------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        remote_prefill: bool = False,
        export_from_block: int | None = None,
    ) -> None:
        """Queue a request; ValueError (nothing queued) when the input is unusable."""
        if request_id in self._requests or self.kv_transfer.has_export(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        req = make_request(
            request_id,
            ids,
            params or SamplingParams(),
            config=self.config,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            tokenizer=self.tokenizer,
            remote_prefill=remote_prefill,
            export_from_block=export_from_block,
        )
        self._requests[request_id] = req
        self.scheduler.add(req)

    def pin_on_finish(self, request_id: str, pin_id: str, expires_at: float, num_tokens: int) -> None:
        """When ``request_id`` finishes normally, pin the cached full blocks of its first
        ``num_tokens`` prompt tokens under ``pin_id`` until ``expires_at`` (engine clock),
        before its own references drop; read the outcome with ``pins.result(pin_id)``."""
        if request_id not in self._requests:
            raise ValueError(f"unknown request {request_id!r}")
        self.pins.ask(request_id, pin_id, expires_at, num_tokens)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (or end its export lease); unknown ids are ignored."""
        self.pins.forget(request_id)
        if self.kv_transfer.has_export(request_id):
            self.kv_transfer.release_export(request_id)
            return
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED, self.clock())
        self._pending_outputs.append(make_output(req))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending_outputs)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion (offline); outputs in prompt order."""
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[rid] for rid in ids]

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the outputs of requests that progressed.

        Failures are contained: a request whose token cannot be sampled, detokenized or
        checked finishes with ``finish_reason="error"`` while the rest of the batch goes
        on; a failed forward pass fails that step's requests only. Only repeated forward
        failures (a broken engine) raise from here.
        """
        now = self.clock()
        self.kv_transfer.expire_leases(now)
        self.pins.maintain(now)
        if self.tiers is not None:
            self.tiers.poll(now)
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule(now)
        if sched.num_tokens == 0:
            if self.scheduler.promoting and self.tiers is not None:
                self.tiers.wait_for_progress(0.01)  # only promotions in flight: don't spin
            return outputs
        try:
            tokens = self.runner.execute(sched)
        except Exception as e:  # noqa: BLE001 - contained below, re-raised when persistent
            return outputs + self._fail_step(sched, e, now)
        self._consecutive_step_failures = 0
        self.scheduler.commit(sched, now)
        sampled = [c.request for c in sched.chunks if c.samples]
        outputs.extend(self._advance(req, token, now) for req, token in zip(sampled, tokens, strict=True))
        return outputs

    def _advance(self, req: Request, token: int | SamplingFailure, now: float) -> RequestOutput:
        """Append one token to ``req`` and build its output; failures fail ``req`` alone."""
        try:
            if isinstance(token, SamplingFailure):
                raise _RequestFailed(token.message)
            req.append_token(token)
            status = stop_status(req, self.eos_token_ids, self.max_model_len)
            if self.config.role == "prefill":
                # A prefill replica's job ends with the first token: lease the blocks out.
                self.kv_transfer.start_export(req, status or RequestStatus.FINISHED_LENGTH, now)
            elif status is not None:
                self.pins.on_finish(req, self.kv, now)  # before its references drop
                self.scheduler.finish(req, status, now)
            out = make_output(req, self.kv_transfer.export_of(req.request_id))
        except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
            if isinstance(e, _RequestFailed):
                message = str(e)
            else:
                logger.exception("request %s failed while generating", req.request_id)
                message = "internal error while generating this request"
            out = self._fail_request(req, message, now)
        if req.status.finished:
            self._requests.pop(req.request_id, None)
        return out

    def _resume_after_remote_prefill(self, req: Request, first_token_id: int, now: float) -> None:
        """``kv_transfer.complete``: the sender's first token goes the way of a sampled one;
        its output comes out of the next ``step()``."""
        self._pending_outputs.append(self._advance(req, first_token_id, now))

    def _fail_step(self, sched: SchedulerOutput, error: Exception, now: float) -> list[RequestOutput]:
        """The forward pass failed: fail the requests of this step, keep the engine serving."""
        self._consecutive_step_failures += 1
        if self._consecutive_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise RuntimeError(f"{self._consecutive_step_failures} forward passes failed in a row") from error
        logger.exception("forward pass failed; failing the %d request(s) of this step", len(sched.chunks))
        outputs = []
        for chunk in sched.chunks:
            req = chunk.request
            outputs.append(self._fail_request(req, "internal error while computing this request", now))
            self._requests.pop(req.request_id, None)
        return outputs

    def _fail_request(self, req: Request, message: str, now: float) -> RequestOutput:
        """Finish ``req`` with ``FINISHED_ERROR`` (freeing or un-leasing its blocks)."""
        req.error = message
        self.pins.forget(req.request_id)
        if self.kv_transfer.has_export(req.request_id):
            self.kv_transfer.release_export(req.request_id)
        elif not req.status.finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, now)
        req.status = RequestStatus.FINISHED_ERROR
        return make_error_output(req, message)

    # ------------------------------------------------------- cache and stats
    def take_events(self) -> KVEventBatch | None:
        """The KV events since the last call, as one numbered batch; None when nothing happened."""
        events = self.pool.take_events()
        if not events:
            return None
        batch = KVEventBatch(self.config.replica_id, self._event_seq_no, self.clock(), events)
        self._event_seq_no += 1
        return batch

    def cache_snapshot(self) -> CacheSnapshot:
        """Every cached block now (events not yet drained are already reflected)."""
        now = self.clock()
        blocks = self.pool.cached_entries(now) + (self.tiers.entries(now) if self.tiers is not None else [])
        return CacheSnapshot(self.config.replica_id, self._event_seq_no - 1, now, blocks)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, in every tier (benchmarks measure compute, not the cache)."""
        self.pool.clear_cache()
        if self.tiers is not None:
            self.tiers.clear()

    def close(self) -> None:
        """Finish queued disk-tier writes and stop its IO thread (the engine is done)."""
        if self.tiers is not None:
            self.tiers.close()

    def stats(self) -> EngineStats:
        """A load snapshot for routers and metrics."""
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(s.promoting),
            num_waiting_for_remote_kv=len(s.remote_waiting),
            num_free_blocks=self.pool.num_free_blocks,
            num_total_blocks=self.pool.num_blocks,
            num_cached_blocks=self.pool.num_free_cached_blocks,
            max_num_seqs=self.config.max_num_seqs,
            kv_usage=self.pool.usage(),
            num_queued_prefill_tokens=s.num_queued_prefill_tokens(),
            prefix_cache_queries=self.kv.num_query_tokens,
            prefix_cache_hits=self.kv.num_hit_tokens,
            num_preemptions=s.num_preemptions,
            num_expired_blocks=self.pool.num_expired,
            num_evicted_blocks=self.pool.num_evicted,
            num_pins=self.pins.num_pins,
            num_pinned_blocks=self.pins.num_pinned_blocks,
            num_pinned_tokens=self.pins.num_pinned_tokens,
            num_expired_pins=self.pins.num_expired,
            kv_block_bytes=self.runner.kv_cache[:, :, 0].nbytes,
            prefix_cache_hits_by_tier=self.kv.hit_tokens_by_tier,
            tiers=self.tiers.stats() if self.tiers is not None else TierStats(),
        )


class _RequestFailed(Exception):
    """Raised inside ``_advance`` for a failure whose message is already client-safe."""
