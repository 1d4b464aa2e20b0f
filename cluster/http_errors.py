"""FastAPI handlers that render every error in its surface's shape and never leak a trace.

Every error a client of the OpenAI routes sees has the shape ``{"error": {"message", "type",
"param", "code"}}`` and the matching HTTP status; other surfaces' routes (Anthropic's
``/v1/messages``) get their own shape through ``cluster.error_shapes`` (the error type itself, ``cluster.wire.ApiError``, crosses
Serve handles too). FastAPI's own 422 validation errors (malformed JSON, wrong types,
out-of-range values) become 400 ``invalid_request_error`` like OpenAI's API, and any
unexpected exception becomes a generic 500 whose body names the request id, not the stack.
``cluster.openapi_doc`` makes the OpenAPI schema say exactly that.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.error_shapes import render_error
from cluster.http_metrics import set_error_code
from cluster.wire import INTERNAL_ERROR, REQUEST_TOO_LARGE, ApiError

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503 (a queue drains, a replica restarts).
RETRY_AFTER_S = 1


def error_response(
    err: ApiError, request_id: str | None = None, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    # No x-request-id here: Serve's proxy echoes the request's id on every response.
    # The shape (and maybe the status) is that of the surface serving ``path``.
    status, body = render_error(path, err)
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    """The ``error`` object of every error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx response: ``{"error": {...}}`` (OpenAI's shape)."""

    error: ErrorDetail


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# The error statuses the API routes answer with, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc("Invalid request: malformed JSON, a wrong type or value, or a prompt over the context."),
    401: _error_doc("An API key is required (the server has keys) and none, or a wrong one, was sent."),
    404: _error_doc("The model does not exist on this server."),
    413: _error_doc("The request body is over the server's size limit."),
    500: _error_doc("This request failed inside the server (others are unaffected)."),
    503: _error_doc("Overloaded, or no replica can take the request now; retry after `Retry-After` seconds."),
    504: _error_doc("The request timed out."),
}


# pydantic's words for "this is not an object"; clients sent JSON, so say JSON.
_NOT_AN_OBJECT = {"model_type", "model_attributes_type", "dict_type"}


def _real_path(loc: tuple[Any, ...], body: Any, error_type: str) -> list[str | int]:
    """The part of pydantic's ``loc`` that names places in the body.

    pydantic adds the union member it tried (``stop.constrained-str``,
    ``messages.0.content.list[ContentPart]``) and ``[key]`` for dict keys; those are not
    fields a client can find, so every part that does not index the body is dropped (but
    the last part of a ``missing`` error, the field that is not there, is kept).
    """
    path: list[str | int] = []
    node = body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif error_type == "missing" and i == len(loc) - 1:
            path.append(part)
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list.

    One error is reported, like OpenAI's API: the deepest one inside the first offending
    field (for a union like ``stop: str | list[str]``, the branch the value matched got
    furthest), a specific complaint before a bare type mismatch, and every union branch's
    complaint about the same place joined with "or".
    """
    errors = [e for e in exc.errors() if isinstance(e, dict)]
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "request body is not valid JSON", None
    body = getattr(exc, "body", None)
    located = [(_real_path(tuple(p for p in e.get("loc", ()) if p != "body"), body, e.get("type", "")), e)
               for e in errors]
    first_path = located[0][0]
    if not first_path:  # the body itself
        if errors[0].get("type") == "missing":
            return "the request body is empty: send a JSON object", None
        return "the request body must be a JSON object", None
    same_field = [(p, e) for p, e in located if p and p[0] == first_path[0]]
    depth = max(len(p) for p, _ in same_field)
    deepest = [(p, e) for p, e in same_field if len(p) == depth]
    chosen = [(p, e) for p, e in deepest if not str(e.get("type", "")).endswith("_type")] or deepest
    path = chosen[0][0]
    messages: list[str] = []
    for p, e in chosen:
        msg = "Input should be a JSON object" if e.get("type") in _NOT_AN_OBJECT else str(e.get("msg", "invalid value"))
        if p == path and msg not in messages:
            messages.append(msg)
    param = ".".join(str(part) for part in path)
    return f"{param}: {' or '.join(messages)}", param


def validation_error(errors: list[Any], body: Any) -> ApiError:
    """pydantic's ``errors`` about ``body`` as the 400 the REST API answers with: other
    surfaces (gRPC) validate with the same models and report the very same message."""
    message, param = _validation_message(RequestValidationError(errors, body=body))
    return ApiError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through the OpenAI error shape; nothing else reaches a client."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        set_error_code(request.state, exc.code or exc.type)
        # Every 503 is transient (overload, a pool restarting): tell clients when to come back.
        headers = {"retry-after": str(RETRY_AFTER_S)} if exc.status_code == 503 else None
        return error_response(exc, getattr(request.state, "request_id", None), headers=headers, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        set_error_code(request.state, "invalid_request_error")
        return error_response(ApiError(400, message, param=param), getattr(request.state, "request_id", None),
                              path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = REQUEST_TOO_LARGE if exc.status_code == 413 else None
        set_error_code(request.state, code or f"http_{exc.status_code}")
        # exc.headers carries e.g. the Allow header of a 405.
        return error_response(ApiError(exc.status_code, detail, code=code), headers=exc.headers, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        logger.exception("unhandled error in request %s", rid)
        set_error_code(request.state, INTERNAL_ERROR)
        return error_response(
            ApiError(500, f"internal error (request {rid})", code=INTERNAL_ERROR), rid, path=request.url.path
        )
