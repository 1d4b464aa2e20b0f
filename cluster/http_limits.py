"""Request-body size limit for the ingress: over-large bodies get 413 before anything parses them.

A pure ASGI middleware (no buffering of its own): a declared ``Content-Length`` over the
limit is refused before the body is read; a body without one (chunked) is counted as it
streams in and refused the moment it passes the limit. Either way the client gets its
surface's error shape (``cluster.error_shapes``), and neither JSON parsing nor tokenizing ever sees the body.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.error_shapes import render_error
from cluster.wire import REQUEST_TOO_LARGE, ApiError


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes"


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes()`` with 413.

    ``max_bytes`` is read per request: the app object is built at import, the replica's
    config arrives later.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._max_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            scope.setdefault("state", {})["error_code"] = REQUEST_TOO_LARGE
            await _send_413(send, limit, scope.get("path", ""))
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI re-raises its own HTTPException from body reading; the
                    # ingress's handler renders it in the OpenAI shape.
                    raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int, path: str) -> None:
    err = ApiError(413, _too_large_message(limit), code=REQUEST_TOO_LARGE)
    status, shaped = render_error(path, err)
    body = json.dumps(shaped).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
