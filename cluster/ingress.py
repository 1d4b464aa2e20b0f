"""The ingress: an OpenAI-compatible FastAPI app under ``@serve.ingress``.

HTTP -> typed request: it validates bodies (pydantic, ``cluster.protocol``), checks the
model name, resolves the tenant from the API key, tokenizes the prompt in a worker thread
(the engine's own length-guarded tokenizer), fills the sampling defaults and sends one
:class:`cluster.wire.GenerateRequest` to the decode pool, whose RequestRouter picks the
replica from the routing hints. The replica's :class:`StreamChunk` values come back as
OpenAI JSON or SSE. It waits for the first chunk before answering, so refusals (context
too long, pool down) still get a proper status code, and the headers can name the
replicas that served the request.
"""

# No ``from __future__ import annotations`` here: Serve's class-based FastAPI views resolve
# route annotations in another module's namespace, where string annotations break.
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from cluster.auth import ApiKeyAuth, ApiKeys, load_api_keys
from cluster.config import ServeConfig
from cluster.http_body import JsonBodyRoute
from cluster.http_errors import ERROR_RESPONSES, install_error_handlers
from cluster.http_limits import BodySizeLimit
from cluster.http_metrics import ApiMetrics, set_error_code
from cluster.metrics import ingress_answer_recorder
from cluster.openapi_doc import document_api, sse_response
from cluster.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    full_response,
    new_request_id,
    sampling_kwargs,
    stream_event,
    usage_event,
)
from cluster.routing import routing_hints
from cluster.tenancy import api_key_from_headers, cache_salt
from cluster.wire import (
    CONTEXT_LENGTH_EXCEEDED,
    DECODE_POOL_UNAVAILABLE,
    MODEL_NOT_FOUND,
    REQUEST_TIMEOUT,
    SERVER_OVERLOADED,
    ApiError,
    GenerateRequest,
    ModelInfo,
    StreamChunk,
)
from engine import ContextLengthExceeded, SamplingParams
from engine.errors import InvalidTokenIds
from engine.intake import check_tokens

logger = logging.getLogger(__name__)

api = FastAPI(title="kvferry", description="OpenAI-compatible LLM serving with disaggregated prefill/decode.")
# Bodies are parsed by kvferry (clear 400s for bad UTF-8, deep nesting, non-JSON types).
api.router.route_class = JsonBodyRoute
install_error_handlers(api)
document_api(api, event_models=(ChatCompletionChunk, CompletionResponse))
# The limit is the replica's config (set in Ingress.__init__, before any request arrives).
api.state.max_request_bytes = 4 << 20
api.add_middleware(BodySizeLimit, max_bytes=lambda: api.state.max_request_bytes)
# Keys before bodies: an unauthenticated client gets its 401 before anything is read.
api.state.api_keys = ApiKeys()
api.add_middleware(ApiKeyAuth, keys=lambda: api.state.api_keys)
# Outermost (added last): counts every answer, the body-size limit's 413s included.
api.state.record_answer = None
api.add_middleware(ApiMetrics, recorder=lambda: api.state.record_answer)
# What each POST route documents: OpenAI-shaped errors, and JSON or SSE events for a 200.
_CHAT_RESPONSES = {**ERROR_RESPONSES, **sse_response(ChatCompletionChunk)}
_COMPLETION_RESPONSES = {**ERROR_RESPONSES, **sse_response(CompletionResponse)}
_INTERRUPTED = f"data: {json.dumps(ApiError(500, 'stream interrupted').body())}\n\n"


@api.middleware("http")
async def _request_id(request: Request, call_next: Any) -> Any:
    """Adopt Serve's request id (its proxy passes it in and echoes it as ``x-request-id``
    on every response, so we must not add a second one)."""
    request.state.request_id = request.headers.get("x-request-id") or new_request_id()
    return await call_next(request)


def _usage(last: StreamChunk) -> Usage:
    return Usage.of(last.prompt_tokens, last.completion_tokens, last.cached_tokens, last.cached_tokens_by_tier)


def _raise_if_error(item: Any) -> StreamChunk:
    if isinstance(item, ApiError):
        raise item
    return item


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP front door; one handle to the decode (or mixed) pool."""

    def __init__(self, config: dict[str, Any], decode: Any) -> None:
        from engine.loader import resolve_model_path, served_model_name
        from engine.tokenizer import load_tokenizer

        self.cfg = ServeConfig.model_validate(config)
        # The pool the ingress talks to: its engine settings bound what requests may ask.
        self.front_engine = self.cfg.engine_config(self.cfg.front_role, "ingress")
        api.state.max_request_bytes = self.cfg.http.max_request_bytes
        api.state.record_answer = ingress_answer_recorder()
        api.state.api_keys = load_api_keys(self.cfg.auth.api_keys_file, self.cfg.auth.api_keys_env)
        if not api.state.api_keys.enabled:
            logger.info("no API keys configured: the API is open (see auth.* in docs/serving.md)")
        self.decode = decode
        self.model_name = self.cfg.model.served_model_name or served_model_name(self.cfg.model.model)
        self._info: ModelInfo | None = None
        # Prompts are tokenized here, in worker threads, never on a replica's engine loop:
        # a huge prompt then delays no other request's steps.
        self._hf_tokenizer = load_tokenizer(resolve_model_path(self.cfg.model.model))
        self._prompt_tokenizer: Any = None

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", responses={s: ERROR_RESPONSES[s] for s in (401, 503)})
    async def models(self) -> ModelList:
        info = await self._model_info()
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=info.max_model_len)])

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_CHAT_RESPONSES)
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await self._serve(body, request, {"messages": messages}, chat=True)

    @api.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION_RESPONSES)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self._serve(body, request, {"prompt": body.prompt}, chat=False)

    # ------------------------------------------------------------------ HTTP -> typed request

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self.decode.model_info.remote()
            except Exception as e:  # noqa: BLE001 - no decode replica answers
                raise ApiError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        return self._info

    async def _prepare(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request, prompt: dict, chat: bool
    ) -> tuple[GenerateRequest, Any]:
        """The typed request for the decode pool, and the routing hints for its router."""
        if body.model != self.model_name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.",
                           code=MODEL_NOT_FOUND, param="model")
        info = await self._model_info()
        param = "messages" if chat else "prompt"
        ids = await self._encode(prompt, info, param)
        kw = sampling_kwargs(body, default_max_tokens=0)
        # Defaults the client left to us: as many tokens as fit, up to the configured default
        # (at least one: a prompt that leaves no room is refused by the check below).
        kw["max_tokens"] = kw["max_tokens"] or max(1, min(self.cfg.model.default_max_tokens, info.max_model_len - len(ids)))
        if kw["cache_ttl_s"] is not None:
            # Providers clamp long retention requests ("24h") to what they offer.
            kw["cache_ttl_s"] = min(kw["cache_ttl_s"], self.front_engine.max_ttl_s)
        key = api_key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        kw["cache_salt"] = cache_salt(key, self.cfg.cache.tenant_isolation)
        try:
            params = SamplingParams(**kw)
            # The engine's own checks, here so that no replica sees a request it must refuse.
            check_tokens(ids, params, info.vocab_size, info.max_model_len)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=param) from e
        except InvalidTokenIds as e:
            raise ApiError(400, str(e), param=param if e.field == "prompt" else e.field) from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        gen_request = GenerateRequest(request.state.request_id, tuple(ids), params, param)
        hints = None
        if self.cfg.routing.request_router == "kvferry":  # the routers need the prompt's block hashes
            hints = routing_hints(ids, info.block_size, info.model_id, params.cache_salt)
        return gen_request, hints

    async def _encode(self, prompt: dict[str, Any], info: ModelInfo, param: str) -> list[int]:
        """The prompt's token ids, tokenized in a worker thread (a text that cannot fit is
        refused from its length first)."""
        from engine.tokenizer import PromptTokenizer

        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = PromptTokenizer(self._hf_tokenizer, info.max_model_len)
        try:
            return await asyncio.to_thread(
                self._prompt_tokenizer.encode_prompt, prompt.get("prompt"), prompt.get("messages")
            )
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=param) from e
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from e

    # ------------------------------------------------------------------ typed stream -> HTTP

    async def _serve(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request, prompt: dict, chat: bool
    ) -> Any:
        gen_request, hints = await self._prepare(body, request, prompt, chat)
        gen = self.decode.options(stream=True).generate.remote(gen_request, hints=hints)
        first = await self._first(gen, gen_request.request_id)
        headers = {"x-kvferry-prefill-replica": first.prefill_replica, "x-kvferry-decode-replica": first.decode_replica}
        rid = ("chatcmpl-" if chat else "cmpl-") + gen_request.request_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = self._sse(first, gen, rid, chat, include_usage, request.state)
            return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
        text, last = await self._collect(first, gen)
        resp = full_response(chat, rid, self.model_name, text, last.finish_reason, _usage(last))
        return JSONResponse(resp.model_dump(), headers=headers)

    async def _first(self, gen: Any, request_id: str) -> StreamChunk:
        """The first chunk, or the error that replaced it."""
        try:
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s)
        except asyncio.TimeoutError as e:
            gen.cancel()
            raise ApiError(504, "timed out waiting for the first token", code=REQUEST_TIMEOUT) from e
        except BackPressureError as e:  # every replica busy and the pool's queue full: shed load now
            raise ApiError(503, "the server is overloaded: every replica is busy and the queue is full; "
                           "retry later", code=SERVER_OVERLOADED) from e
        except Exception as e:  # noqa: BLE001 - replica death, unavailable pool
            logger.warning("decode pool failed for %s: %r", request_id, e)
            raise ApiError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        return _raise_if_error(first)

    async def _collect(self, first: StreamChunk, gen: Any) -> tuple[str, StreamChunk]:
        """The whole text of a non-streamed request, and its last chunk."""
        text, last = first.new_text, first
        try:
            while not last.finished:
                last = _raise_if_error(await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s))
                text += last.new_text
        except (asyncio.TimeoutError, StopAsyncIteration) as e:
            gen.cancel()
            raise ApiError(504, "generation did not finish in time", code=REQUEST_TIMEOUT) from e
        except BaseException:
            # Client went away (handler cancelled) or the replica failed: stop generating.
            gen.cancel()
            raise
        return text, last

    async def _sse(
        self, first: StreamChunk, gen: Any, rid: str, chat: bool, include_usage: bool, state: Any
    ) -> AsyncIterator[str]:
        """OpenAI SSE: one event per chunk, an optional usage event, then [DONE].

        Headers are gone by now, so a failure is reported in-band, never as a trace.
        """
        item: Any = first
        try:
            while True:
                if isinstance(item, ApiError):  # the replica failed mid-stream: say so, then stop
                    set_error_code(state, item.code or item.type)
                    yield f"data: {json.dumps(item.body())}\n\n"
                    break
                finish = item.finish_reason if item.finished else None
                yield stream_event(chat, rid, self.model_name, item.new_text, finish, first=item is first)
                if item.finished:
                    if include_usage:
                        yield usage_event(chat, rid, self.model_name, _usage(item))
                    break
                item = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s)
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            logger.warning("stream %s broke: %r", rid, e)
            set_error_code(state, "stream_interrupted")
            yield _INTERRUPTED
        finally:
            gen.cancel()
