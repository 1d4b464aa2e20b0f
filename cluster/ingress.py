"""The ingress: an OpenAI-compatible FastAPI app under ``@serve.ingress``.

It validates bodies (pydantic), checks the model name, picks nothing itself — the decode
pool's handle routes the request — and turns the decode replica's stream into OpenAI JSON
or SSE. Headers name the replicas that served the request. It waits for the first chunk
before answering, so refusals (context too long, pool down) still get a proper status
code, and the headers can name the prefill replica.
"""

# No ``from __future__ import annotations`` here: Serve's class-based FastAPI views resolve
# route annotations in another module's namespace, where string annotations break.
import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.config import ServeConfig
from cluster.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    DECODE_POOL_UNAVAILABLE,
    ERROR_RESPONSES,
    MODEL_NOT_FOUND,
    REQUEST_TIMEOUT,
    KvferryError,
    document_openai_errors,
    install_error_handlers,
)
from cluster.http_limits import BodySizeLimit
from cluster.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    new_request_id,
    sampling_kwargs,
)
from cluster.routing import routing_hints
from cluster.tenancy import api_key_from_headers, cache_salt

logger = logging.getLogger(__name__)

api = FastAPI(title="kvferry", description="OpenAI-compatible LLM serving with disaggregated prefill/decode.")
install_error_handlers(api)
document_openai_errors(api)
# The limit is the replica's config (set in Ingress.__init__, before any request arrives).
api.state.max_request_bytes = 4 << 20
api.add_middleware(BodySizeLimit, max_bytes=lambda: api.state.max_request_bytes)
_SSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "JSON, or server-sent events when `stream` is true."}}


@api.middleware("http")
async def _request_id(request: Request, call_next: Any) -> Any:
    """Adopt Serve's request id (its proxy passes it in and echoes it as ``x-request-id``
    on every response, so we must not add a second one)."""
    request.state.request_id = request.headers.get("x-request-id") or new_request_id()
    return await call_next(request)


def _usage(last: dict[str, Any]) -> Usage:
    return Usage.of(last["prompt_tokens"], last["completion_tokens"], last["cached_tokens"])


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP front door; one handle to the decode (or mixed) pool."""

    def __init__(self, config: dict[str, Any], decode: Any) -> None:
        from engine.loader import resolve_model_path, served_model_name
        from engine.tokenizer import load_tokenizer

        self.cfg = ServeConfig.model_validate(config)
        api.state.max_request_bytes = self.cfg.http.max_request_bytes
        self.decode = decode
        self.model_name = self.cfg.model.served_model_name or served_model_name(self.cfg.model.model)
        self._info: dict[str, Any] | None = None
        # Prompts are tokenized here, in worker threads, never on a replica's engine loop:
        # a huge prompt then delays no other request's steps.
        self._hf_tokenizer = load_tokenizer(resolve_model_path(self.cfg.model.model))
        self._prompt_tokenizer: Any = None

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            try:
                self._info = await self.decode.model_info.remote()
            except Exception as e:  # noqa: BLE001 - no decode replica answers
                raise KvferryError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        return self._info

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", responses={503: ERROR_RESPONSES[503]})
    async def models(self) -> ModelList:
        info = await self._model_info()
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=info["max_model_len"])])

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERROR_RESPONSES, **_SSE})
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        payload = {"messages": [{"role": m.role, "content": m.text()} for m in body.messages]}
        return await self._serve(body, request, payload, chat=True)

    @api.post("/v1/completions", response_model=CompletionResponse, responses={**ERROR_RESPONSES, **_SSE})
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self._serve(body, request, {"prompt": body.prompt}, chat=False)

    # ------------------------------------------------------------------ plumbing

    async def _encode(self, prompt: dict[str, Any], info: dict[str, Any], param: str, max_tokens: int | None) -> list[int]:
        """The prompt's token ids, tokenized in a worker thread; 400 when it cannot fit."""
        from engine import ContextLengthExceeded
        from engine.tokenizer import PromptTokenizer

        if self._prompt_tokenizer is None:
            self._prompt_tokenizer = PromptTokenizer(self._hf_tokenizer, info["max_model_len"])
        try:
            ids = await asyncio.to_thread(self._prompt_tokenizer.encode_prompt, prompt.get("prompt"), prompt.get("messages"))
        except ContextLengthExceeded as e:
            raise KvferryError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param=param) from e
        except ValueError as e:
            raise KvferryError(400, str(e), param=param) from e
        if not ids:
            raise KvferryError(400, "the prompt is empty", param=param)
        if max(ids) >= info["vocab_size"]:
            raise KvferryError(400, f"prompt token ids must be below the vocabulary size {info['vocab_size']}", param=param)
        limit = info["max_model_len"]
        if len(ids) + (max_tokens or 1) > limit:
            raise KvferryError(
                400,
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens or 1}: "
                f"{len(ids) + (max_tokens or 1)} exceeds this model's context of {limit} tokens",
                code=CONTEXT_LENGTH_EXCEEDED, param=param,
            )
        return ids

    async def _serve(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request, prompt: dict, chat: bool
    ) -> Any:
        if body.model != self.model_name:
            raise KvferryError(
                404, f"The model '{body.model}' does not exist; this server serves '{self.model_name}'.",
                code=MODEL_NOT_FOUND, param="model",
            )
        rid = request.state.request_id
        params = sampling_kwargs(body, default_max_tokens=0)
        params["max_tokens"] = body.requested_max_tokens()  # None: the replica decides
        params["cache_salt"] = cache_salt(
            api_key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key")),
            self.cfg.cache.tenant_isolation,
        )
        info = await self._model_info()
        param = "messages" if chat else "prompt"
        ids = await self._encode(prompt, info, param, body.requested_max_tokens())
        if body.logit_bias and max(map(int, body.logit_bias)) >= info["vocab_size"]:
            raise KvferryError(400, f"logit_bias token ids must be below the vocabulary size {info['vocab_size']}",
                               param="logit_bias")
        payload = {"request_id": rid, "params": params, "prompt_token_ids": ids, "prompt_param": param}
        salt = params["cache_salt"]
        hints = None
        if self.cfg.request_router == "kvferry":  # the routers need the prompt's block hashes
            hints = routing_hints(ids, info["block_size"], info["model_id"], salt)
        try:
            gen = self.decode.options(stream=True).generate.remote(payload, hints=hints)
            first = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s)
        except asyncio.TimeoutError as e:
            raise KvferryError(504, "timed out waiting for the first token", code=REQUEST_TIMEOUT) from e
        except (StopAsyncIteration, KvferryError):
            raise
        except Exception as e:  # noqa: BLE001 - replica death, backpressure, unavailable pool
            logger.warning("decode pool failed for %s: %r", rid, e)
            raise KvferryError(503, "decode pool unavailable, retry later", code=DECODE_POOL_UNAVAILABLE) from e
        if "error" in first:
            raise KvferryError.from_dict(first["error"])
        headers = {
            "x-kvferry-prefill-replica": first["prefill_replica"],
            "x-kvferry-decode-replica": first["decode_replica"],
        }
        created_id = ("chatcmpl-" if chat else "cmpl-") + rid
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = self._sse(first, gen, created_id, chat, include_usage)
            return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
        text, last = first["new_text"], first
        try:
            while not last["finished"]:
                last = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s)
                if "error" in last:
                    raise KvferryError.from_dict(last["error"])
                text += last["new_text"]
        except (asyncio.TimeoutError, StopAsyncIteration) as e:
            gen.cancel()
            raise KvferryError(504, "generation did not finish in time", code=REQUEST_TIMEOUT) from e
        except BaseException:
            # Client went away (handler cancelled) or the replica failed: stop generating.
            gen.cancel()
            raise
        usage = _usage(last)
        if chat:
            resp: Any = ChatCompletionResponse(
                id=created_id, model=self.model_name, usage=usage,
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=last["finish_reason"])],
            )
        else:
            resp = CompletionResponse(
                id=created_id, model=self.model_name, usage=usage,
                choices=[CompletionChoice(text=text, finish_reason=last["finish_reason"])],
            )
        return JSONResponse(resp.model_dump(), headers=headers)

    async def _sse(
        self, first: dict, gen: Any, created_id: str, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        """OpenAI SSE: one event per engine output, an optional usage event, then [DONE]."""
        chunk, role_sent = first, False
        try:
            while True:
                if "error" in chunk:  # the replica died mid-stream: say so in-band, then stop
                    yield f"data: {{\"error\": {_json(chunk['error'])}}}\n\n"
                    break
                finish = chunk["finish_reason"] if chunk["finished"] else None
                if chat:
                    delta = DeltaMessage(content=chunk["new_text"])
                    if not role_sent:
                        delta.role, role_sent = "assistant", True
                    event: Any = ChatCompletionChunk(
                        id=created_id, model=self.model_name,
                        choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                    )
                else:
                    event = CompletionResponse(
                        id=created_id, model=self.model_name,
                        choices=[CompletionChoice(text=chunk["new_text"], finish_reason=finish)],
                    )
                yield f"data: {event.model_dump_json(exclude_none=chat)}\n\n"
                if chunk["finished"]:
                    if include_usage:
                        usage = _usage(chunk)
                        if chat:
                            tail: Any = ChatCompletionChunk(id=created_id, model=self.model_name, choices=[], usage=usage)
                        else:
                            tail = CompletionResponse(id=created_id, model=self.model_name, choices=[], usage=usage)
                        yield f"data: {tail.model_dump_json()}\n\n"
                    break
                chunk = await asyncio.wait_for(gen.__anext__(), timeout=self.cfg.http.request_timeout_s)
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band, never a trace
            logger.warning("stream %s broke: %r", created_id, e)
            yield 'data: {"error": {"message": "stream interrupted", "type": "server_error", "code": null, "param": null}}\n\n'
        finally:
            gen.cancel()


def _json(obj: Any) -> str:
    import json

    return json.dumps({k: v for k, v in obj.items() if k != "status_code"})
