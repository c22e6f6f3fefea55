"""The OpenAPI document, made exact (issue 10, item 8).

FastAPI documents what the routes declare; three things it cannot know are fixed here:

* Validation errors are answered 400 with OpenAI's error body (services/gateway/errors.py),
  never FastAPI's 422 `HTTPValidationError`: the 422 entries and their schemas are dropped.
* A stream's events: `text/event-stream` documents each event (OpenAPI 3.1: the media
  type's `schema` describes one event, as schemathesis and OpenAPI 3.2's `itemSchema` read
  it): its `data` is one chunk as JSON (or, after the stream started, an error body), then
  the literal `[DONE]`. The chunk models are added to `components` for those references.
* Authentication happens in the middleware, before routing, so no route declares it: the
  key schemes (a bearer token, or Azure's `api-key` header) are added to every operation
  of the tenant routes (/v1/*, except the public model list; /tokenize, /detokenize) and
  the admin routes.
* 405: a path's `Allow` lists every method of every route on that path
  (`method_not_allowed`); Starlette's router names only the first route's methods.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.gateway.middleware import is_tenant_route
from services.inference.errors import error_body
from services.inference.protocol.responses import ChatCompletionChunk, CompletionChunk, ErrorResponse

REF = "#/components/schemas/{model}"
ADMIN_PREFIX = "/admin/"
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`: a tenant's API key (the admin key on /admin)",
    },
    "api-key": {"type": "apiKey", "in": "header", "name": "api-key", "description": "The same key"},
}
# Referenced only from the documents' event-stream entries, so FastAPI does not add them.
STREAMED_MODELS: tuple[type, ...] = (ChatCompletionChunk, CompletionChunk, ErrorResponse)


def event_stream(chunk: type, description: str) -> dict[str, Any]:
    """A route's 200 `text/event-stream` entry (for `responses=`): one `chunk` per event."""
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [
                        {"$ref": REF.format(model=chunk.__name__)},
                        {"$ref": REF.format(model=ErrorResponse.__name__)},
                    ]
                },
            },
        ]
    }
    schema = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"description": description, "content": {"text/event-stream": {"schema": schema}}}


def install_openapi(app: FastAPI) -> None:
    """Serve the exact document at /openapi.json, and answer 405 with the full `Allow`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            _drop_validation_422(document)
            _declare_keys(document)
            _add_models(document, STREAMED_MODELS)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(405, method_not_allowed)


async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """405 with `Allow` naming every method the path takes (RFC 9110, section 15.5.6)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        methods = getattr(route, "methods", None)
        if match is not Match.NONE and methods:
            allowed |= set(methods)
    headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else {}
    headers["Allow"] = ", ".join(sorted(allowed))
    return JSONResponse(
        error_body("Method Not Allowed", "invalid_request_error", code="method_not_allowed"),
        status_code=405,
        headers=headers,
    )


def _drop_validation_422(document: dict[str, Any]) -> None:
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _declare_keys(document: dict[str, Any]) -> None:
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, item in document.get("paths", {}).items():
        if is_tenant_route(path) or path.startswith(ADMIN_PREFIX):
            for operation in item.values():
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]


def _add_models(document: dict[str, Any], models: tuple[type, ...]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = TypeAdapter(model).json_schema(ref_template=REF)
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas.setdefault(model.__name__, schema)
