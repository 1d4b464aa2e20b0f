"""Which error shape a path's clients expect: OpenAI's by default, others by path prefix.

Every surface renders the same :class:`cluster.wire.ApiError` values; only the JSON
envelope differs (OpenAI ``{"error": {"message", "type", "param", "code"}}``, Google's
``{"error": {"code", "message", "status"}}`` on ``/v1beta/``, ...). A surface registers its
renderer for its path prefix once, at import; the error handlers, the API-key check and
the body-size limit all ask :func:`error_body_for`, so even answers that never reach a
route come in the shape the client parses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.wire import ApiError

Renderer = Callable[[ApiError], dict[str, Any]]

_SHAPES: list[tuple[str, Renderer]] = []


def register_error_shape(path_prefix: str, render: Renderer) -> None:
    """Render errors of paths under ``path_prefix`` with ``render`` (idempotent)."""
    if all(prefix != path_prefix for prefix, _ in _SHAPES):
        _SHAPES.append((path_prefix, render))


def error_body_for(path: str | None, err: ApiError) -> dict[str, Any]:
    """The error envelope for a request to ``path``."""
    for prefix, render in _SHAPES:
        if path and path.startswith(prefix):
            return render(err)
    return err.body()
