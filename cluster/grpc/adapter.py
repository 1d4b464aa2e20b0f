"""The gRPC surface: kvferry.v1.Inference's methods over the shared :class:`FrontDoor`.

Serve's gRPC proxy hands each call to the ingress deployment's method of the same name
(``Chat``, ``ChatStream``...) with the decoded request and a ``grpc_context``; those
methods delegate here. Each call: the API key from ``authorization: Bearer`` metadata (the
same keys and tenant salt as HTTP), the proto made into the REST request model (same
validation, same messages), :meth:`FrontDoor.open`, and the chunks rendered as proto
messages. Errors become status codes: a unary call sets code and details and returns an
empty message; a stream sets them and raises :class:`StatusSet` (Serve keeps the code the
context carries), since a generator has no other way to end with a status.

A client deadline or cancellation reaches the method as ``asyncio.CancelledError`` (Serve
cancels the call when the client's RPC ends); every path then cancels the generation, so
the engine aborts the request and frees its blocks. Every answer is counted in
``kvferry_api_requests_total`` like HTTP's, with the RPC's path as ``route`` and REST's
status (499 for a call the client gave up on).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from cluster.auth import ApiKeys
from cluster.front_door import FrontDoor, Generation
from cluster.grpc import kvferry_pb2 as pb
from cluster.grpc import translate
from cluster.inference import InferenceRequest
from cluster.protocol import new_request_id
from cluster.tenancy import api_key_from_headers
from cluster.wire import INTERNAL_ERROR, INVALID_API_KEY, ApiError

logger = logging.getLogger(__name__)

# (route, status, code) -> None, as cluster.http_metrics counts HTTP answers.
Recorder = Callable[[str, str, str], None]
CLIENT_GONE = 499  # nginx's "client closed request": a deadline or a cancel


class StatusSet(Exception):
    """A stream ended with the status code already set on its context."""


class GrpcSurface:
    """kvferry.v1.Inference for one ingress replica."""

    def __init__(self, door: FrontDoor, keys: Callable[[], ApiKeys],
                 recorder: Callable[[], Recorder | None] = lambda: None) -> None:
        self.door = door
        self._keys = keys  # () -> ApiKeys: the same keys the HTTP middleware checks
        self._recorder = recorder

    async def list_models(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        try:
            self._api_key(_metadata(context))
            info = await self.door.model_info()
        except ApiError as e:
            self._answered("ListModels", e)
            _set_status(context, e)
            return pb.ListModelsResponse()
        self._answered("ListModels", None)
        model = pb.Model(id=self.door.model_name, owned_by="kvferry", max_model_len=info.max_model_len)
        return pb.ListModelsResponse(models=[model])

    async def unary(self, request: Any, context: Any, chat: bool) -> pb.ChatResponse | pb.CompletionResponse:
        """``Chat`` or ``Complete``: the whole answer in one message."""
        rid, rpc, outcome = _request_id(context), "Chat" if chat else "Complete", _gone()
        try:
            gen = await self._open(request, context, chat, rid)
            text, last = await gen.collect()  # cancels the generation if this call is cancelled
            outcome = None
            return translate.full_response(chat, _response_id(chat, rid), self.door.model_name, text, last)
        except ApiError as e:
            outcome = e
        except Exception:  # noqa: BLE001 - a client gets a status, never a trace
            logger.exception("gRPC request %s failed", rid)
            outcome = _internal(rid)
        finally:
            self._answered(rpc, outcome)
        _set_status(context, outcome)
        return pb.ChatResponse() if chat else pb.CompletionResponse()

    async def stream(self, request: Any, context: Any, chat: bool) -> AsyncIterator[pb.ChatChunk | pb.CompletionChunk]:
        """``ChatStream`` or ``CompleteStream``: one message per chunk, usage on the last."""
        rid, rpc, outcome = _request_id(context), "ChatStream" if chat else "CompleteStream", _gone()
        gen: Generation | None = None
        try:
            gen = await self._open(request, context, chat, rid)
            async for item in gen.chunks():
                yield translate.chunk(chat, _response_id(chat, rid), self.door.model_name, item)
            outcome = None
        except ApiError as e:
            outcome = e
        except Exception:  # noqa: BLE001 - a client gets a status, never a trace
            logger.exception("gRPC stream %s failed", rid)
            outcome = _internal(rid)
        finally:
            if gen is not None:  # finished, failed, or the client went away: free the blocks
                gen.cancel()
            self._answered(rpc, outcome)
        if outcome is not None:
            _set_status(context, outcome)
            raise StatusSet(outcome.message)

    # ------------------------------------------------------------------ shared

    async def _open(self, request: Any, context: Any, chat: bool, rid: str) -> Generation:
        req = self._inference(request, chat, rid, self._api_key(_metadata(context)))
        gen = await self.door.open(req)
        # Which replicas served it, as trailing metadata (HTTP sends the same as headers).
        context.set_trailing_metadata(list(gen.headers().items()))  # Serve appends its request_id
        return gen

    def _inference(self, request: Any, chat: bool, rid: str, api_key: str | None) -> InferenceRequest:
        default_ttl_s = self.door.front_engine.default_ttl_s
        if chat:
            req = translate.chat_request(request, rid, api_key, default_ttl_s)
        else:
            req = translate.completion_request(request, rid, api_key)
        return replace(req, surface="grpc")

    def _api_key(self, metadata: dict[str, str]) -> str | None:
        """The caller's key (``authorization: Bearer``, or ``x-api-key``), checked like HTTP's."""
        key = api_key_from_headers(metadata.get("authorization"), metadata.get("x-api-key"))
        if not self._keys().allows(key):
            message = ("Missing API key: send it as 'authorization: Bearer KEY' metadata." if key is None
                       else "Incorrect API key provided.")
            raise ApiError(401, message, code=INVALID_API_KEY)
        return key

    def _answered(self, rpc: str, outcome: ApiError | None) -> None:
        """Count one answer: REST's status and error code (``ok`` for a success)."""
        record = self._recorder()
        if record is None:
            return
        status, code = (200, "ok") if outcome is None else (outcome.status_code, outcome.code or outcome.type)
        try:
            record(f"/{pb.DESCRIPTOR.services_by_name['Inference'].full_name}/{rpc}", str(status), code)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            pass


def _metadata(context: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _set_status(context: Any, err: ApiError) -> None:
    context.set_code(translate.status_code(err))
    context.set_details(err.message)


def _request_id(context: Any) -> str:
    """Serve's id of this call (its proxy puts it in the trailing metadata it sends back, and
    takes the client's ``request_id`` metadata if there is one), else a fresh id."""
    for key, value in context.trailing_metadata() or ():
        if key == "request_id" and value:
            return str(value)
    return new_request_id()


def _response_id(chat: bool, rid: str) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + rid


def _gone() -> ApiError:
    """The outcome of a call until it ends otherwise: the client left (deadline or cancel)."""
    return ApiError(CLIENT_GONE, "the client cancelled the call or its deadline passed", code="client_cancelled")


def _internal(rid: str) -> ApiError:
    return ApiError(500, f"internal error (request {rid})", code=INTERNAL_ERROR)

