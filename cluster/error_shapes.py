"""Which error shape a request's client expects, by the path it called.

Every refusal inside kvferry is one :class:`~cluster.wire.ApiError`; each API surface
renders it its own way. OpenAI's ``{"error": {"message", "type", "param", "code"}}`` is the
default; a surface with its own shape registers its path prefix here, and the error
handlers, the API-key check and the body-size limit (which all answer before any route
runs) render through :func:`render_error`. A surface may also change the status (Anthropic
answers overload with 529).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.anthropic_responses import anthropic_error
from cluster.gemini_protocol import google_error_body
from cluster.wire import ApiError

# (status, body) of an error, in one surface's shape.
ErrorRenderer = Callable[[ApiError], tuple[int, dict[str, Any]]]

# Path prefix -> the renderer of the surface served under it.
def _google(err: ApiError) -> tuple[int, dict[str, Any]]:
    return err.status_code, google_error_body(err)


SHAPES: tuple[tuple[str, ErrorRenderer], ...] = (
    ("/v1/messages", anthropic_error),
    ("/v1beta", _google),  # Gemini: {"error": {"code", "message", "status"}}
)


def _openai(err: ApiError) -> tuple[int, dict[str, Any]]:
    return err.status_code, err.body()


def renderer_for(path: str) -> ErrorRenderer:
    """The renderer of the surface that serves ``path`` (OpenAI's when none claims it)."""
    for prefix, render in SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return render
    return _openai


def render_error(path: str, err: ApiError) -> tuple[int, dict[str, Any]]:
    """``err`` as the client of ``path`` expects it: (status, body)."""
    return renderer_for(path)(err)
