"""The HTTP adapter's error handlers: the core's error table (services/inference/errors.py)
as JSON responses and SSE events, and FastAPI's own errors in the same OpenAI shape.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import GenerationFailed, PhiserveError, TenancyUnavailable
from services.inference.errors import error_body, error_payload, invalid_request_from
from services.inference.metrics import GatewayMetrics
from services.inference.protocol.responses import ErrorResponse

logger = logging.getLogger(__name__)


def error_response(exc: PhiserveError) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def sse_error_event(exc: PhiserveError) -> str:
    """An error after the stream started: the status line is gone, so send the body."""
    _, body, _ = error_payload(exc)
    return f"data: {json.dumps(body)}\n\n"


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(invalid_request_from(exc.errors()))


def count_redis_down(metrics: GatewayMetrics | None, exc: PhiserveError) -> None:
    """Count a `TenancyUnavailable` as a refusal (reason `tenancy_unavailable`): counted at
    the edge because it can come from any Redis step (auth, admission, usage); every other
    refusal is counted where it is decided."""
    if metrics is not None and isinstance(exc, TenancyUnavailable):
        metrics.rejected.inc(tags={"reason": "tenancy_unavailable"})


async def _on_phiserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PhiserveError)
    count_redis_down(getattr(request.app.state, "metrics", None), exc)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
    return JSONResponse(
        error_body(str(exc.detail), "invalid_request_error", code=code),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The client sees no stack trace; the log has it.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    # The same error as gRPC's for an unexpected failure (services/grpc/servicer.py).
    return error_response(GenerationFailed("internal server error", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(PhiserveError, _on_phiserve_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


# Documented in OpenAPI through each route's `responses=`: every error is OpenAI's body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "model": ErrorResponse}
    for status, description in (
        (400, "Invalid request (`param` names the field)"),
        (401, "Missing, unknown or revoked API key"),
        (403, "The key's tenant may not use this model or route"),
        (404, "Unknown model, file or batch"),
        (413, "Request body too large"),
        (429, "Tenant limit reached or queue timeout; see Retry-After and x-ratelimit-*"),
        (500, "The engine failed to generate"),
        (503, "No live replica for the model; retry after `Retry-After` seconds"),
    )
}
