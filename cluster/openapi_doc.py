"""The served OpenAPI schema (``/openapi.json``), made to say what the server does.

FastAPI's generated schema gets three things wrong for this API, and ``document_api``
fixes them: it documents a 422 the server never sends (validation errors are 400 in
OpenAI's error shape, ``cluster.http_errors``); it has no schema for the server-sent events
of a streamed completion; and the models of those events are not in its components.

The event stream is documented the way OpenAPI 3.1 tools read ``text/event-stream``
(schemathesis among them; OpenAPI 3.2 calls it ``itemSchema``): the media type's schema
describes *one event*, an object whose ``data`` is either the ``[DONE]`` sentinel or a
JSON document: a chunk, or an in-band error once the headers are gone.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cluster.http_errors import ErrorResponse

_REF = "#/components/schemas/{model}"


def sse_response(event_model: type[BaseModel], error_model: type[BaseModel] = ErrorResponse,
                 done: bool = True) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route answering JSON, or SSE events of ``event_model``
    (errors after the headers in ``error_model``'s shape; ``done``: a ``[DONE]`` sentinel ends it)."""
    event = {
        "type": "object",
        "description": "One server-sent event (`data: ...`).",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]", "description": "The last event of a stream that ended normally."},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [
                            {"$ref": _REF.format(model=event_model.__name__)},
                            {"$ref": _REF.format(model=error_model.__name__)},
                        ]},
                        "description": f"A `{event_model.__name__}`, or an error after which the stream ends.",
                    },
                ]
            }
        },
    }
    if not done:
        event["properties"]["data"] = event["properties"]["data"]["anyOf"][1]
    return {200: {"content": {"text/event-stream": {"schema": event}},
                  "description": "JSON, or server-sent events when `stream` is true."}}


def _add_models(schemas: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put ``models`` (and the models they use) into the components, as clients may receive them.

    Validation mode on purpose: chat stream events leave out fields that are ``None``
    (``exclude_none``), so a field with a default is not required in them. A model already
    there (a route's response model, complete in every event) keeps FastAPI's schema.
    """
    for model in models:
        schema = model.model_json_schema(ref_template=_REF, mode="validation")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, schema)


def document_api(app: FastAPI, event_models: tuple[type[BaseModel], ...] = ()) -> None:
    """Replace ``app.openapi`` with one that documents 400s (no 422) and the SSE event models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            _add_models(schemas, event_models)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
