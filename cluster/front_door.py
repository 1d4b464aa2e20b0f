"""The one request path behind every API surface: OpenAI, Anthropic, Gemini and gRPC.

Each surface is a thin adapter: it parses its own request shape into an
:class:`InferenceRequest`, calls :meth:`FrontDoor.open`, and renders the
:class:`Generation`'s chunks (and any :class:`~cluster.wire.ApiError`) in its own shape.
Everything else happens once, here: the model-name check, tenancy (the API key becomes
the cache salt), tokenizing with the model's chat template in a worker thread (cache
breakpoints become token counts), sampling defaults and the engine's own request checks,
routing hints, the call to the decode pool, and the wait for the first chunk (so a
refusal still gets a status code before any header is sent). A breakpoint shorter than
``cache.min_cacheable_tokens`` is dropped here. When a request finishes, its prompt-cache
reads and writes are counted once, per surface and TTL class (``cluster.cache_usage``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import BackPressureError

from cluster.cache_usage import CacheAccount, cache_account
from cluster.config import ServeConfig
from cluster.inference import InferenceRequest
from cluster.routing import routing_hints
from cluster.tenancy import cache_salt
from cluster.wire import (
    CONTEXT_LENGTH_EXCEEDED,
    DECODE_POOL_UNAVAILABLE,
    MODEL_NOT_FOUND,
    REQUEST_TIMEOUT,
    SERVER_OVERLOADED,
    ApiError,
    GenerateRequest,
    ModelInfo,
    PinAsk,
    StreamChunk,
)
from engine import CacheBreakpoint, ContextLengthExceeded, SamplingParams
from engine.errors import InvalidTokenIds
from engine.intake import check_tokens

logger = logging.getLogger(__name__)

# (surface, account) -> None: one finished request's prompt-cache tokens (the metrics).
CacheRecorder = Callable[[str, CacheAccount], None]


@dataclass
class Generation:
    """A request the decode pool accepted: its first chunk, then the rest on iteration."""

    request: GenerateRequest
    first: StreamChunk
    # Where each cache breakpoint fell, in prompt tokens (Anthropic usage needs them).
    breakpoints: tuple[CacheBreakpoint, ...]
    _stream: Any
    _timeout_s: float
    # Called once with the finished chunk (the FrontDoor's cache metrics).
    _on_finish: Callable[[StreamChunk], None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def headers(self) -> dict[str, str]:
        """Which replicas served the request (every surface's response headers)."""
        return {"x-kvferry-prefill-replica": self.first.prefill_replica,
                "x-kvferry-decode-replica": self.first.decode_replica}

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """The first chunk and every later one, up to the finished chunk; a replica's
        ApiError is raised. The caller must :meth:`cancel` when it stops early."""
        item = self.first
        while True:
            if item.finished and self._on_finish is not None:
                self._on_finish(item)
            yield item
            if item.finished:
                return
            try:
                nxt = await asyncio.wait_for(self._stream.__anext__(), timeout=self._timeout_s)
            except (asyncio.TimeoutError, StopAsyncIteration) as e:
                raise ApiError(504, "generation did not finish in time", code=REQUEST_TIMEOUT) from e
            item = _raise_if_error(nxt)

    async def collect(self) -> tuple[str, StreamChunk]:
        """The whole text and the last chunk; stops the generation if the caller goes away."""
        text, last = "", self.first
        try:
            async for last in self.chunks():
                text += last.new_text
        finally:
            if not last.finished:
                self.cancel()
        return text, last

    def cancel(self) -> None:
        """Abort the request in the engine (its blocks are freed)."""
        self._stream.cancel()


def _raise_if_error(item: Any) -> StreamChunk:
    if isinstance(item, ApiError):
        raise item
    return item


class FrontDoor:
    """Validates, tokenizes, routes and starts requests for every surface of one app."""

    def __init__(
        self, cfg: ServeConfig, decode: Any, model_name: str, hf_tokenizer: Any,
        record_cache: CacheRecorder | None = None,
    ) -> None:
        self.cfg = cfg
        self.decode = decode
        self.model_name = model_name
        # The pool the ingress talks to: its engine settings bound what requests may ask.
        self.front_engine = cfg.engine_config(cfg.front_role, "ingress")
        self._hf_tokenizer = hf_tokenizer
        self._prompt_tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._record_cache = record_cache

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self.decode.model_info.remote()
            except Exception as e:  # noqa: BLE001 - no decode replica answers
                raise ApiError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        return self._info

    def check_model(self, model: str, param: str = "model") -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           code=MODEL_NOT_FOUND, param=param)

    async def count_tokens(self, req: InferenceRequest) -> int:
        """The prompt's length in tokens, as :meth:`open` would send it."""
        self.check_model(req.model)
        ids, _ = await self._encode(req, await self.model_info())
        return len(ids)

    async def prepare(self, req: InferenceRequest) -> tuple[GenerateRequest, Any, tuple[CacheBreakpoint, ...]]:
        """The typed request for the decode pool, its routing hints, and its breakpoints."""
        self.check_model(req.model)
        info = await self.model_info()
        ids, marks_at = await self._encode(req, info)
        max_tokens = req.max_tokens or max(1, min(self.cfg.model.default_max_tokens, info.max_model_len - len(ids)))
        cap = self.front_engine.max_ttl_s  # providers clamp long retention asks ("24h") to what they offer
        ttl = None if req.cache_ttl_s is None else min(req.cache_ttl_s, cap)
        # A breakpoint under the minimum cacheable length caches nothing (Anthropic's rule).
        shortest = max(1, self.cfg.cache.min_cacheable_tokens)
        breakpoints = tuple(CacheBreakpoint(n, min(m.ttl_s, cap))
                            for n, m in zip(marks_at, req.cache_marks) if n >= shortest)
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=req.seed, stop=list(req.stop), ignore_eos=req.ignore_eos, logit_bias=dict(req.logit_bias),
                cache_ttl_s=ttl, cache_breakpoints=breakpoints,
                cache_salt=cache_salt(req.api_key, self.cfg.cache.tenant_isolation),
            )
            # The engine's own checks, here so that no replica sees a request it must refuse.
            check_tokens(ids, params, info.vocab_size, info.max_model_len)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=req.prompt_param) from e
        except InvalidTokenIds as e:
            raise ApiError(400, str(e), param=req.prompt_param if e.field == "prompt" else e.field) from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        pin = None if req.pin is None else PinAsk(req.pin.cache_id, req.pin.expires_at, req.pin.num_tokens or len(ids))
        gen_request = GenerateRequest(req.request_id, tuple(ids), params, req.prompt_param, pin=pin)
        hints = None
        if self.cfg.routing.request_router == "kvferry":  # the routers need the prompt's block hashes
            hints = routing_hints(ids, info.block_size, info.model_id, params.cache_salt,
                                  cache_key=req.prompt_cache_key, prefer_replica=req.prefer_replica)
        return gen_request, hints, breakpoints

    async def open(self, req: InferenceRequest) -> Generation:
        """Start ``req`` on the decode pool and wait for its first chunk (or its refusal)."""
        gen_request, hints, breakpoints = await self.prepare(req)
        stream = self.decode.options(stream=True).generate.remote(gen_request, hints=hints)
        timeout_s = self.cfg.http.request_timeout_s
        try:
            first = await asyncio.wait_for(stream.__anext__(), timeout=timeout_s)
        except asyncio.TimeoutError as e:
            stream.cancel()
            raise ApiError(504, "timed out waiting for the first token", code=REQUEST_TIMEOUT) from e
        except asyncio.CancelledError:  # the client went away (a gRPC deadline, a disconnect)
            stream.cancel()
            raise
        except BackPressureError as e:  # every replica busy and the pool's queue full: shed load now
            raise ApiError(503, "the server is overloaded: every replica is busy and the queue is full; "
                           "retry later", code=SERVER_OVERLOADED) from e
        except Exception as e:  # noqa: BLE001 - replica death, unavailable pool
            logger.warning("decode pool failed for %s: %r", req.request_id, e)
            raise ApiError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        on_finish = None if self._record_cache is None else self._cache_metrics(req.surface, gen_request)
        return Generation(gen_request, _raise_if_error(first), breakpoints, stream, timeout_s, on_finish)

    def _cache_metrics(self, surface: str, request: GenerateRequest) -> Callable[[StreamChunk], None]:
        """The finished-chunk callback that records a request's cache reads and writes."""
        record, params = self._record_cache, request.params
        default_ttl = params.cache_ttl_s or self.front_engine.default_ttl_s
        block_size = self._info.block_size if self._info is not None else self.front_engine.block_size

        def on_finish(last: StreamChunk) -> None:
            try:
                account = cache_account(last.prompt_tokens, last.cached_tokens, block_size, default_ttl,
                                        params.cache_breakpoints)
                if record is not None:
                    record(surface, account)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                logger.debug("cache metrics failed", exc_info=True)

        return on_finish

    async def _encode(self, req: InferenceRequest, info: ModelInfo) -> tuple[list[int], list[int]]:
        """Prompt token ids and each cache mark's position in tokens, tokenized in a worker
        thread (never on a replica's engine loop: a huge prompt then delays no other
        request's steps; a text that cannot fit is refused from its length first)."""
        from engine.tokenizer import PromptTokenizer

        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = PromptTokenizer(self._hf_tokenizer, info.max_model_len)
        tok = self._prompt_tokenizer
        messages = None if req.messages is None else [{"role": t.role, "content": t.text} for t in req.messages]
        marks = [(m.message, m.chars) for m in req.cache_marks]
        try:
            if messages is not None and marks:
                return await asyncio.to_thread(tok.encode_chat_with_marks, messages, marks)
            if messages is not None and not req.add_generation_prompt:
                return await asyncio.to_thread(tok.encode_chat, messages, False), []
            prompt = list(req.prompt) if isinstance(req.prompt, tuple) else req.prompt
            ids = await asyncio.to_thread(tok.encode_prompt, prompt, messages)
            return ids, []
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=req.prompt_param) from e
        except ValueError as e:
            raise ApiError(400, str(e), param=req.prompt_param) from e

