"""The ingress: the FastAPI app under ``@serve.ingress`` that serves every HTTP surface.

Each route is a thin adapter: it validates its body (pydantic, e.g. ``cluster.protocol``
for OpenAI), turns it into a surface-neutral :class:`cluster.inference.InferenceRequest`
and hands it to the :class:`cluster.front_door.FrontDoor`, which checks the model,
resolves the tenant, tokenizes, routes and waits for the first chunk (so refusals still
get a status code, and the headers can name the replicas that served the request). The
route renders the replica's :class:`StreamChunk` values in its surface's shape: OpenAI
JSON or SSE here, Anthropic's through ``cluster.anthropic_surface``. The same deployment
serves gRPC: Serve's gRPC proxy calls the methods named after kvferry.v1.Inference's RPCs,
one-line delegates to ``cluster.grpc.adapter``.
"""

# No ``from __future__ import annotations`` here: Serve's class-based FastAPI views resolve
# route annotations in another module's namespace, where string annotations break.
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.anthropic_protocol import CountTokensRequest, MessagesRequest
from cluster.anthropic_responses import CountTokensResponse, MessageResponse
from cluster.anthropic_surface import ERROR_RESPONSES as ANTHROPIC_ERRORS
from cluster.anthropic_surface import MESSAGES_RESPONSES, AnthropicMessages
from cluster.auth import ApiKeyAuth, ApiKeys, load_api_keys
from cluster.config import ServeConfig
from cluster.explicit_cache_api import ExplicitCaches
from cluster.explicit_caches import ExplicitCache
from cluster.front_door import FrontDoor, Generation
from cluster.gemini_api import GeminiApi
from cluster.gemini_protocol import (
    GOOGLE_ERROR_RESPONSES,
    CachedContent,
    CreateCachedContent,
    GenerateContentRequest,
    GenerateContentResponse,
    GoogleErrorResponse,
    ListCachedContents,
    UpdateCachedContent,
)
from cluster.grpc.adapter import GrpcSurface
from cluster.http_body import JsonBodyRoute
from cluster.http_errors import ERROR_RESPONSES, install_error_handlers
from cluster.http_limits import BodySizeLimit
from cluster.http_metrics import ApiMetrics, set_error_code
from cluster.inference import InferenceRequest
from cluster.metrics import cache_usage_recorder, ingress_answer_recorder
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
    stream_event,
    usage_event,
)
from cluster.tenancy import api_key_from_headers, google_api_key
from cluster.wire import ApiError, StreamChunk

logger = logging.getLogger(__name__)

api = FastAPI(title="kvferry", description="OpenAI-compatible LLM serving with disaggregated prefill/decode.")
# Bodies are parsed by kvferry (clear 400s for bad UTF-8, deep nesting, non-JSON types).
api.router.route_class = JsonBodyRoute
install_error_handlers(api)
document_api(api, event_models=(ChatCompletionChunk, CompletionResponse, GenerateContentResponse, GoogleErrorResponse))
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
_GOOGLE = GOOGLE_ERROR_RESPONSES
_GOOGLE_STREAM = {**GOOGLE_ERROR_RESPONSES, **sse_response(GenerateContentResponse, GoogleErrorResponse, done=False)}


@api.middleware("http")
async def _request_id(request: Request, call_next: Any) -> Any:
    """Adopt Serve's request id (its proxy passes it in and echoes it as ``x-request-id``
    on every response, so we must not add a second one)."""
    request.state.request_id = request.headers.get("x-request-id") or new_request_id()
    return await call_next(request)


def _usage(last: StreamChunk) -> Usage:
    return Usage.of(last.prompt_tokens, last.completion_tokens, last.cached_tokens, last.cached_tokens_by_tier)


def _api_key(request: Request) -> str | None:
    return api_key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))


def _google_key(request: Request) -> str | None:
    """Gemini clients: ``x-goog-api-key`` or ``?key=`` (a bearer token works too)."""
    return _api_key(request) or google_api_key(request.headers.get("x-goog-api-key"), request.url.query)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP front door; one handle to the decode (or mixed) pool."""

    def __init__(self, config: dict[str, Any], decode: Any) -> None:
        from engine.loader import resolve_model_path, served_model_name
        from engine.tokenizer import load_tokenizer

        self.cfg = ServeConfig.model_validate(config)
        api.state.max_request_bytes = self.cfg.http.max_request_bytes
        api.state.record_answer = ingress_answer_recorder()
        api.state.api_keys = load_api_keys(self.cfg.auth.api_keys_file, self.cfg.auth.api_keys_env)
        if not api.state.api_keys.enabled:
            logger.info("no API keys configured: the API is open (see auth.* in docs/serving.md)")
        model_name = self.cfg.model.served_model_name or served_model_name(self.cfg.model.model)
        # Prompts are tokenized here, in worker threads, never on a replica's engine loop.
        tokenizer = load_tokenizer(resolve_model_path(self.cfg.model.model))
        self.door = FrontDoor(self.cfg, decode, model_name, tokenizer, record_cache=cache_usage_recorder())
        self.anthropic = AnthropicMessages(self.door)
        self.caches = ExplicitCaches(self.door)
        self.gemini = GeminiApi(self.door, self.caches)
        self.grpc = GrpcSurface(self.door, lambda: api.state.api_keys, lambda: api.state.record_answer)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", responses={s: ERROR_RESPONSES[s] for s in (401, 503)})
    async def models(self) -> ModelList:
        info = await self.door.model_info()
        return ModelList(data=[ModelCard(id=self.door.model_name, max_model_len=info.max_model_len)])

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_CHAT_RESPONSES)
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        req = body.to_inference(request.state.request_id, _api_key(request), self.door.front_engine.default_ttl_s)
        entry = None
        if body.cached_content:  # extension: an explicit cache's contents prefix the messages
            entry = await self.caches.resolve(body.cached_content, req.api_key, req.model, "cached_content")
            req = self.caches.apply(entry, req)
        return await self._serve(body, req, request, chat=True, entry=entry)

    @api.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION_RESPONSES)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        req = body.to_inference(request.state.request_id, _api_key(request))
        return await self._serve(body, req, request, chat=False)

    # ------------------------------------------------------------------ Anthropic Messages

    @api.post("/v1/messages", response_model=MessageResponse, responses=MESSAGES_RESPONSES)
    async def messages(self, body: MessagesRequest, request: Request) -> Any:
        return await self.anthropic.create(body, request)

    @api.post("/v1/messages/count_tokens", response_model=CountTokensResponse, responses=ANTHROPIC_ERRORS)
    async def count_tokens(self, body: CountTokensRequest, request: Request) -> Any:
        return await self.anthropic.count_tokens(body, request)

    # ------------------------------------------------------------------ Gemini (/v1beta): explicit caches

    @api.post("/v1beta/cachedContents", response_model=CachedContent, responses=_GOOGLE)
    async def create_cached_content(self, body: CreateCachedContent, request: Request) -> Any:
        return await self.caches.create(body, _google_key(request), request.state.request_id)

    @api.get("/v1beta/cachedContents", response_model=ListCachedContents, responses=_GOOGLE)
    async def list_cached_contents(self, request: Request, pageSize: int = Query(50, ge=1, le=1000),  # noqa: N803
                                   pageToken: str = "") -> Any:  # noqa: N803 - Google's query names
        return await self.caches.list(_google_key(request), pageSize, pageToken)

    @api.get("/v1beta/cachedContents/{cache_id}", response_model=CachedContent, responses=_GOOGLE)
    async def get_cached_content(self, cache_id: str, request: Request) -> Any:
        return await self.caches.get(cache_id, _google_key(request))

    @api.patch("/v1beta/cachedContents/{cache_id}", response_model=CachedContent, responses=_GOOGLE)
    async def update_cached_content(self, cache_id: str, body: UpdateCachedContent, request: Request,
                                    updateMask: str | None = None) -> Any:  # noqa: N803
        return await self.caches.update(cache_id, body, updateMask, _google_key(request))

    @api.delete("/v1beta/cachedContents/{cache_id}", responses=_GOOGLE)
    async def delete_cached_content(self, cache_id: str, request: Request) -> dict[str, Any]:
        await self.caches.delete(cache_id, _google_key(request))
        return {}

    @api.post("/v1beta/models/{model}:generateContent", response_model=GenerateContentResponse, responses=_GOOGLE)
    async def generate_content(self, model: str, body: GenerateContentRequest, request: Request) -> Any:
        return await self.gemini.generate(model, body, request.state.request_id, _google_key(request), stream=False)

    @api.post("/v1beta/models/{model}:streamGenerateContent", responses=_GOOGLE_STREAM)
    async def stream_generate_content(self, model: str, body: GenerateContentRequest, request: Request) -> Any:
        return await self.gemini.generate(model, body, request.state.request_id, _google_key(request), stream=True)

    # ------------------------------------------------------------------ gRPC (kvferry.v1.Inference)
    # Serve's gRPC proxy calls the method named like the RPC; cluster/grpc/adapter.py does the work.

    async def ListModels(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - the RPC's name
        return await self.grpc.list_models(request, grpc_context)

    async def Chat(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self.grpc.unary(request, grpc_context, chat=True)

    async def Complete(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        return await self.grpc.unary(request, grpc_context, chat=False)

    async def ChatStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async with aclosing(self.grpc.stream(request, grpc_context, chat=True)) as messages:
            async for message in messages:  # closed at once when Serve stops reading: blocks freed
                yield message

    async def CompleteStream(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async with aclosing(self.grpc.stream(request, grpc_context, chat=False)) as messages:
            async for message in messages:  # closed at once when Serve stops reading: blocks freed
                yield message

    # ------------------------------------------------------------------ typed stream -> OpenAI

    async def _serve(
        self, body: ChatCompletionRequest | CompletionRequest, req: InferenceRequest, request: Request, chat: bool,
        entry: ExplicitCache | None = None,
    ) -> Any:
        gen = await self.door.open(req)
        if entry is not None:
            await self.caches.served(entry, gen)
        rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = self._sse(gen, rid, chat, include_usage, request.state)
            return StreamingResponse(sse, media_type="text/event-stream", headers=gen.headers())
        text, last = await gen.collect()
        resp = full_response(chat, rid, self.door.model_name, text, last.finish_reason, _usage(last))
        return JSONResponse(resp.model_dump(), headers=gen.headers())

    async def _sse(self, gen: Generation, rid: str, chat: bool, include_usage: bool, state: Any) -> AsyncIterator[str]:
        """OpenAI SSE: one event per chunk, an optional usage event, then [DONE].

        Headers are gone by now, so a failure is reported in-band, never as a trace.
        """
        model = self.door.model_name
        try:
            async for item in gen.chunks():
                finish = item.finish_reason if item.finished else None
                yield stream_event(chat, rid, model, item.new_text, finish, first=item is gen.first)
                if item.finished and include_usage:
                    yield usage_event(chat, rid, model, _usage(item))
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the replica failed mid-stream: say so, then stop
            set_error_code(state, e.code or e.type)
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            logger.warning("stream %s broke: %r", rid, e)
            set_error_code(state, "stream_interrupted")
            yield _INTERRUPTED
        finally:
            gen.cancel()
