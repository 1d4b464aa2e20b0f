"""``LLMEngine``: one replica's engine (model, paged KV, prompt cache, scheduler).

The step, nano-vllm style: schedule -> run the model -> commit and sample -> outputs.
The incremental API (``add_request`` / ``step`` / ``abort``) is what servers drive;
``generate`` wraps it for offline use. See docs/engine-api.md for the full contract,
including the prefill/decode roles used for disaggregated serving.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.errors import ContextLengthExceeded
from engine.detokenizer import StopChecker
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import CacheSnapshot, KVEventBatch
from engine.model_runner import ModelRunner, kv_bytes_per_block
from engine.models import resolve_dtype
from engine.outputs import EngineStats, KVExport, RemotePrefillPlan, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import SamplingFailure
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import PromptTokenizer

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
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or model_config.max_model_len, model_config.max_model_len)
        self.eos_token_ids = frozenset(model_config.eos_token_ids or [])
        # The engine's notion of "now", seconds; tests inject a fake clock, servers may use
        # wall time so block expiries compare across processes.
        self.clock = clock
        self.kv_dtype = resolve_dtype(config.dtype)
        self.device = torch.device(config.device)

        per_block = kv_bytes_per_block(
            model_config.num_layers, config.block_size, model_config.num_kv_heads, model_config.head_dim, self.kv_dtype
        )
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            num_blocks = config.kv_cache_memory_bytes // per_block
            if num_blocks < 2:
                raise ValueError(
                    f"kv_cache_memory_bytes={config.kv_cache_memory_bytes} holds fewer than 2 blocks of {per_block} bytes"
                )
        self.pool = BlockPool(num_blocks)
        self.kv = KVCacheManager(self.pool, config.block_size, model_id)
        self.scheduler = Scheduler(config, self.kv)
        self.runner = ModelRunner(
            model,
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            num_blocks=num_blocks,
            block_size=config.block_size,
            dtype=self.kv_dtype,
            device=self.device,
            attention_backend=config.attention_backend,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            cuda_graph_max_batch=config.cuda_graph_max_batch,
            fused_kernels=config.fused_kernels,
            prefill_attention=config.prefill_attention,
        )
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        # Prefill role: finished requests whose blocks are leased to a receiver, with lease start.
        self._exports: dict[str, tuple[Request, float]] = {}
        self._event_seq_no = 0
        self._ids = itertools.count()
        self._consecutive_step_failures = 0
        self._prompt_tokenizer: PromptTokenizer | None = None

    # ------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, model: str | Path = "default", *, clock: Callable[[], float] | None = None, **options: Any
    ) -> LLMEngine:
        """Load ``model`` (HF dir, .gguf file or "default") with EngineConfig ``options``.

        A misspelt option raises a ``ValueError`` naming the valid ones.
        """
        from engine.loader import load_model, resolve_model_path, served_model_name  # noqa: PLC0415
        from engine.tokenizer import load_tokenizer  # noqa: PLC0415

        config = EngineConfig.model_validate(options)
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
        params = params or SamplingParams()
        if request_id in self._requests or request_id in self._exports:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {max(params.logit_bias)}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{len(ids) + params.max_tokens} exceeds this model's context of {self.max_model_len} tokens",
                max_model_len=self.max_model_len,
            )
        ttl = params.cache_ttl_s if params.cache_ttl_s is not None else self.config.default_ttl_s
        if ttl > self.config.max_ttl_s:
            raise ValueError(f"cache TTL {ttl:g}s exceeds the maximum of {self.config.max_ttl_s:g}s")
        if remote_prefill and self.config.role != "decode":
            raise ValueError("remote_prefill needs an engine with role='decode'")
        if export_from_block is not None and self.config.role != "prefill":
            raise ValueError("export_from_block needs an engine with role='prefill'")
        if self.config.role == "prefill" and export_from_block is None:
            export_from_block = 0
        req = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            ttl_s=ttl,
            stop_checker=StopChecker(self.tokenizer, list(params.stop)),
            remote_prefill=remote_prefill,
            export_from_block=export_from_block,
        )
        self._requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        if request_id in self._exports:
            self.release_kv_export(request_id)
            return
        req = self._requests.get(request_id)
        if req is None:
            return
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED, self.clock())
        self._pending_outputs.append(self._output(req))
        self._forget(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending_outputs)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return the outputs of requests that progressed.

        Failures are contained: a request whose token cannot be sampled, detokenized or
        checked finishes with ``finish_reason="error"`` while the rest of the batch goes
        on; a failed forward pass fails that step's requests only. Only repeated forward
        failures (a broken engine) raise from here.
        """
        now = self.clock()
        self._expire_leases(now)
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule(now)
        if sched.num_tokens == 0:
            return outputs
        try:
            tokens = self.runner.execute(sched)
        except Exception as e:  # noqa: BLE001 - contained below, re-raised when persistent
            return outputs + self._fail_step(sched, e, now)
        self._consecutive_step_failures = 0
        self.scheduler.commit(sched, now)
        sampled = [c.request for c in sched.chunks if c.samples]
        for req, token in zip(sampled, tokens, strict=True):
            outputs.append(self._advance(req, token, now))
        return outputs

    def _advance(self, req: Request, token: int | SamplingFailure, now: float) -> RequestOutput:
        """Append one sampled token to ``req`` and build its output; failures fail ``req`` alone."""
        try:
            if isinstance(token, SamplingFailure):
                raise _RequestFailed(token.message)
            self._append_token(req, token, now)
            out = self._output(req)
        except Exception as e:  # noqa: BLE001 - this request's failure, not the batch's
            if isinstance(e, _RequestFailed):
                message = str(e)
            else:
                logger.exception("request %s failed while generating", req.request_id)
                message = "internal error while generating this request"
            out = self._fail_request(req, message, now)
        if req.status.finished:
            self._forget(req)
        return out

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
            self._forget(req)
        return outputs

    def _fail_request(self, req: Request, message: str, now: float) -> RequestOutput:
        """Finish ``req`` with ``FINISHED_ERROR`` (freeing or un-leasing its blocks)."""
        req.error = message
        if req.request_id in self._exports:
            self.release_kv_export(req.request_id)
        elif not req.status.finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ERROR, now)
        req.status = RequestStatus.FINISHED_ERROR
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            new_token_ids=[],
            text="",
            new_text="",
            finished=True,
            finish_reason=req.status.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            error=message,
        )

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
        bar = None
        if use_tqdm:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while len(final) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    final[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [final[rid] for rid in ids]

    # ---------------------------------------------------------- disaggregation
    def take_remote_prefill_plans(self) -> list[RemotePrefillPlan]:
        """Decode role: requests that now wait for prompt KV from a prefill replica."""
        return self.scheduler.take_plans()

    def kv_block_shape(self) -> tuple[int, ...]:
        """(num_layers, 2, block_size, H_kv, D) of one block across all layers."""
        l, two, _, bs, h, d = self.runner.kv_cache.shape
        return (l, two, bs, h, d)

    def read_kv_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """(L, 2, n, block_size, H_kv, D) contiguous copy of ``block_ids``."""
        self._check_block_ids(block_ids)
        return self.runner.read_blocks(list(block_ids))

    def write_kv_blocks(self, block_ids: Sequence[int], buffer: torch.Tensor) -> None:
        """Write a buffer from :meth:`read_kv_blocks` (of another engine) into ``block_ids``."""
        self._check_block_ids(block_ids)
        l, two, bs, h, d = self.kv_block_shape()
        expected = (l, two, len(block_ids), bs, h, d)
        if tuple(buffer.shape) != expected:
            raise ValueError(f"KV buffer shape {tuple(buffer.shape)} != expected {expected}")
        self.runner.write_blocks(list(block_ids), buffer)

    def is_waiting_for_remote_kv(self, request_id: str) -> bool:
        """Decode role: True while ``request_id`` still owns its reserved blocks and awaits KV.

        Check it right before ``write_kv_blocks``: an aborted request's blocks may already
        belong to another request.
        """
        return request_id in self.scheduler.remote_waiting

    def complete_remote_prefill(
        self, request_id: str, first_token_id: int, num_cached_tokens: int | None = None
    ) -> None:
        """Decode role: the prompt KV landed; resume with the prefill replica's first token."""
        req = self.scheduler.remote_waiting.get(request_id)
        if req is None:
            return  # aborted meanwhile
        now = self.clock()
        self.scheduler.complete_remote(req, now)
        if num_cached_tokens is not None:
            req.num_cached_tokens = num_cached_tokens
        self._append_token(req, int(first_token_id), now)
        self._pending_outputs.append(self._output(req))
        if req.status.finished:
            self._forget(req)

    def fail_remote_prefill(self, request_id: str) -> None:
        """Decode role: the transfer failed; prefill the prompt locally instead."""
        req = self.scheduler.remote_waiting.get(request_id)
        if req is not None:
            self.scheduler.fail_remote(req, self.clock())

    def release_kv_export(self, request_id: str) -> None:
        """Prefill role: the receiver has the blocks (or gave up); end the lease."""
        entry = self._exports.pop(request_id, None)
        if entry is not None:
            self.kv.free(entry[0], self.clock())

    # ------------------------------------------------------- cache and stats
    def take_events(self) -> KVEventBatch | None:
        events = self.pool.take_events()
        if not events:
            return None
        batch = KVEventBatch(self.config.replica_id, self._event_seq_no, self.clock(), events)
        self._event_seq_no += 1
        return batch

    def cache_snapshot(self) -> CacheSnapshot:
        """Every cached block now (events not yet drained are already reflected)."""
        now = self.clock()
        return CacheSnapshot(self.config.replica_id, self._event_seq_no - 1, now, self.pool.cached_entries(now))

    def reset_prefix_cache(self) -> None:
        self.pool.clear_cache()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_waiting_for_remote_kv=len(s.remote_waiting),
            num_free_blocks=self.pool.num_free_blocks,
            num_total_blocks=self.pool.num_blocks,
            kv_usage=self.pool.usage(),
            num_queued_prefill_tokens=s.num_queued_prefill_tokens(),
            prefix_cache_queries=self.kv.num_query_tokens,
            prefix_cache_hits=self.kv.num_hit_tokens,
            num_preemptions=s.num_preemptions,
        )

    # -------------------------------------------------------------- internals
    def _append_token(self, req: Request, token: int, now: float) -> None:
        req.append_token(token)
        p = req.params
        checker = req.stop_checker
        status: RequestStatus | None = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            status = RequestStatus.FINISHED_STOPPED
            checker.update(req.output_token_ids[:-1])  # the stop token is not text
        elif checker.update(req.output_token_ids):
            status = RequestStatus.FINISHED_STOPPED
        elif req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if self.config.role == "prefill":
            # A prefill replica's job ends with the first token: lease the blocks out.
            self.scheduler.finish(req, status or RequestStatus.FINISHED_LENGTH, now, free_blocks=False)
            self._exports[req.request_id] = (req, now)
        elif status is not None:
            self.scheduler.finish(req, status, now)

    def _output(self, req: Request) -> RequestOutput:
        checker = req.stop_checker
        finished = req.status.finished
        if finished:
            checker.flush()
        new_text = checker.delta(finished)
        new_ids = req.output_token_ids[req.num_emitted_tokens :]
        req.num_emitted_tokens = req.num_output_tokens
        export = None
        if req.request_id in self._exports:
            first = req.export_from_block or 0
            export = KVExport([b.block_id for b in req.blocks[first:]], first, req.num_prompt_tokens)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            new_token_ids=new_ids,
            text=checker.text[: checker.emitted],
            new_text=new_text,
            finished=finished,
            finish_reason=req.status.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            kv_export=export,
        )

    def _forget(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)

    def _expire_leases(self, now: float) -> None:
        timeout = self.config.export_lease_timeout_s
        for rid in [r for r, (_, t) in self._exports.items() if now - t > timeout]:
            self.release_kv_export(rid)

    def _check_block_ids(self, block_ids: Sequence[int]) -> None:
        n = self.pool.num_blocks
        if any(not 0 <= b < n for b in block_ids):
            raise ValueError(f"block ids must be in [0, {n})")


class _RequestFailed(Exception):
    """Raised inside ``_advance`` for a failure whose message is already client-safe."""
