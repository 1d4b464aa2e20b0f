"""The Gemini ``generateContent`` surface: a thin adapter over the one request path.

``POST /v1beta/models/{model}:generateContent`` answers one JSON
``GenerateContentResponse``; ``:streamGenerateContent?alt=sse`` streams one per chunk as
``data: {...}`` events (the framing the google-genai SDK parses; no ``[DONE]``), each
with the usage so far. ``cachedContent`` names an explicit cache
(``cluster.explicit_cache_api``): its contents prefix the request's, and
``usageMetadata.cachedContentTokenCount`` says how many prompt tokens came from it.
Without one, the count is the automatic prompt cache's hit, as Gemini reports implicit
caching.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from cluster.explicit_cache_api import ExplicitCaches
from cluster.explicit_caches import ExplicitCache
from cluster.front_door import FrontDoor, Generation
from cluster.gemini_protocol import (
    GenerateContentRequest,
    GenerationConfig,
    UsageMetadata,
    google_error_body,
    response,
    to_turns,
)
from cluster.inference import InferenceRequest
from cluster.wire import ApiError, StreamChunk

logger = logging.getLogger(__name__)


def to_inference(model: str, body: GenerateContentRequest, request_id: str, api_key: str | None) -> InferenceRequest:
    """The surface-neutral request of a ``generateContent`` body."""
    gc = body.generation_config or GenerationConfig()
    top_k = -1
    if gc.top_k is not None:
        if gc.top_k != int(gc.top_k):
            raise ApiError(400, f"generationConfig.topK must be a whole number, got {gc.top_k}",
                           param="generationConfig.topK")
        top_k = int(gc.top_k)
    return InferenceRequest(
        request_id, model, messages=to_turns(body.contents, body.system_instruction), prompt_param="contents",
        max_tokens=gc.max_output_tokens, temperature=1.0 if gc.temperature is None else gc.temperature,
        top_p=1.0 if gc.top_p is None else gc.top_p, top_k=top_k, seed=gc.seed,
        stop=tuple(gc.stop_sequences or ()), api_key=api_key, surface="gemini",
    )


class GeminiApi:
    """``generateContent`` and ``streamGenerateContent`` for one ingress replica."""

    def __init__(self, door: FrontDoor, caches: ExplicitCaches) -> None:
        self.door = door
        self.caches = caches

    async def generate(self, model: str, body: GenerateContentRequest, request_id: str, api_key: str | None,
                       stream: bool) -> Any:
        self.door.check_model(model)
        req = to_inference(model, body, request_id, api_key)
        entry = None
        if body.cached_content:
            entry = await self.caches.resolve(body.cached_content, api_key, model, "cachedContent")
            req = self.caches.apply(entry, req)
        gen = await self.door.open(req)
        if entry is not None:
            await self.caches.served(entry, gen)
        if stream:
            return StreamingResponse(self._sse(gen, entry, request_id), media_type="text/event-stream",
                                     headers=gen.headers())
        text, last = await gen.collect()
        body_out = response(text, last.finish_reason, self._usage(last, entry), model, request_id)
        return JSONResponse(body_out.model_dump(by_alias=True, exclude_none=True), headers=gen.headers())

    def _usage(self, chunk: StreamChunk, entry: ExplicitCache | None) -> UsageMetadata:
        cached = chunk.cached_tokens if entry is None else self.caches.cached_tokens(entry, chunk.cached_tokens)
        return UsageMetadata(prompt_token_count=chunk.prompt_tokens, candidates_token_count=chunk.completion_tokens,
                             total_token_count=chunk.prompt_tokens + chunk.completion_tokens,
                             cached_content_token_count=cached)

    async def _sse(self, gen: Generation, entry: ExplicitCache | None, rid: str) -> AsyncIterator[str]:
        """One event per chunk; a failure after the headers is reported in-band, in Google's shape."""
        model = self.door.model_name
        try:
            async for item in gen.chunks():
                if not item.new_text and not item.finished:
                    continue
                out = response(item.new_text, item.finish_reason if item.finished else None,
                               self._usage(item, entry), model, rid)
                yield f"data: {out.model_dump_json(by_alias=True, exclude_none=True)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(google_error_body(e))}\n\n"
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            logger.warning("gemini stream %s broke: %r", rid, e)
            yield f"data: {json.dumps(google_error_body(ApiError(500, 'stream interrupted')))}\n\n"
        finally:
            gen.cancel()
