"""Request bodies of the API routes: JSON objects in UTF-8, parsed once, with clear 400s.

FastAPI's own body parsing answers every parse failure other than a syntax error with
"There was an error parsing the body" (a deeply nested document, invalid UTF-8, an integer
with thousands of digits), and hands a body sent as ``text/plain`` or a form to validation
as raw bytes ("Input should be a valid dictionary..."). A client then cannot tell what to
fix. :class:`JsonBodyRoute` parses the body itself and names the problem instead; every
message ends up in OpenAI's error shape through the ingress's ``HTTPException`` handler.

Nesting is bounded by the JSON parser itself: CPython's ``json`` recurses once per level
and raises ``RecursionError`` at the interpreter's recursion limit (about a thousand
levels), well before the stack is in danger, so a 100 000-level document costs one failed
parse of a few hundred microseconds and nothing else.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

# Python's own cap on int <-> str conversion (3.11+): longer integer literals are refused.
_MAX_INT_DIGITS = 4300
# A \uXXXX escape of a UTF-16 surrogate; json.loads turns a lone one into a str that cannot
# be encoded again (a model name echoed in a 404 then broke the response itself: a 500).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _is_json_media_type(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _kind(value: Any) -> str:
    """JSON's name for a parsed value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


class _NotJsonNumber(ValueError):
    """``NaN`` or ``Infinity``: Python's json reads them, JSON (RFC 8259) has no such numbers."""


def _not_json(constant: str) -> Any:
    raise _NotJsonNumber(constant)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or an ``HTTPException(400)`` that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPException(
            400, f"the request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}"
        ) from e
    try:
        value = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise HTTPException(
            400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from e
    except _NotJsonNumber as e:
        raise HTTPException(400, f"the request body is not valid JSON: {e} is not a JSON number") from e
    except RecursionError as e:
        raise HTTPException(400, "the request body's JSON is nested too deeply (arrays or objects more than "
                                 "about a thousand levels deep)") from e
    except ValueError as e:  # int(...) over the digit limit
        raise HTTPException(
            400, f"the request body has a number with more than {_MAX_INT_DIGITS} digits"
        ) from e
    if not isinstance(value, dict):
        raise HTTPException(400, f"the request body must be a JSON object, got {_kind(value)}")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise HTTPException(400, "the request body has a string with an unpaired UTF-16 surrogate escape "
                                 "(\\ud800-\\udfff alone): strings must be valid Unicode")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a parsed document is not valid Unicode.

    Iterative on purpose: the document may be nested as deep as the parser allows.
    Only run when the text has a surrogate escape at all (a regex scan), so an ordinary
    body costs nothing more.
    """
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


class JsonBodyRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_body` (what FastAPI calls for a body)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class JsonBodyRoute(APIRoute):
    """An API route that takes a JSON object body, parsed by :class:`JsonBodyRequest`.

    A body sent with a non-JSON ``Content-Type``, or none, is refused by name (FastAPI
    would not parse it either: a body without a type is how a browser page sends a
    cross-site request without asking first). Routes without a body (the GETs) are untouched.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if takes_body and not (content_type and _is_json_media_type(content_type)):
                got = repr(content_type) if content_type else "no Content-Type"
                raise HTTPException(400, f"the request body must be JSON (Content-Type: application/json), got {got}")
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return route_handler
