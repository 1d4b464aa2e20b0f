"""Count every API answer of the ingress by route, HTTP status and kvferry error code.

A pure ASGI middleware, outermost, so it also sees answers that never reach a route (413
from the body-size limit, 404 for unknown paths). The error code comes from the request's
``state`` (``error_code``), which the error handlers and the body-size limit set; a
stream that failed after its 200 sets it too, so it counts as ``status=200`` with its code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Recorder: (route, status, code) -> None. Set by the replica (Serve's metrics exist only
# inside a replica); None records nothing.
Recorder = Callable[[str, str, str], None]


def set_error_code(scope_or_state: Any, code: str) -> None:
    """Remember this request's error code for the metrics (an ASGI scope or a request.state)."""
    if isinstance(scope_or_state, dict):
        scope_or_state.setdefault("state", {})["error_code"] = code
    else:
        scope_or_state.error_code = code


def _route(scope: Scope) -> str:
    # Starlette sets the matched route in the scope; unmatched paths share one label so a
    # scanner cannot blow up the metric's cardinality.
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class ApiMetrics:
    """Call ``recorder()`` once per HTTP request, after its response ends."""

    def __init__(self, app: ASGIApp, recorder: Callable[[], Recorder | None]) -> None:
        self.app = app
        self._recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes everything is a 500 to the client

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            record = self._recorder()
            if record is not None:
                code = scope.get("state", {}).get("error_code") or ("ok" if status < 400 else f"http_{status}")
                try:
                    record(_route(scope), str(status), code)
                except Exception:  # noqa: BLE001 - metrics must never fail a request
                    pass
