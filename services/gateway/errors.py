"""The gateway's one error table: phiserve errors -> HTTP status, OpenAI body, SSE event.

Every error a client can see is produced here, so REST, streaming (and later gRPC)
agree on status, `type`, `code` and `param`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import (
    AuthenticationFailed,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    PhiserveError,
    RateLimited,
    RequestTooLarge,
    ResourceNotFound,
    ServiceUnavailable,
)

logger = logging.getLogger(__name__)

# class -> (HTTP status, OpenAI error `type`). Looked up along the MRO, so a
# subclass (ContextLengthExceeded) inherits its parent's row (InvalidRequest).
ERROR_TABLE: dict[type[PhiserveError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    AuthenticationFailed: (401, "authentication_error"),
    PermissionDenied: (403, "permission_error"),
    ModelNotFound: (404, "invalid_request_error"),
    ResourceNotFound: (404, "invalid_request_error"),
    RequestTooLarge: (413, "invalid_request_error"),
    RateLimited: (429, "rate_limit_error"),
    Overloaded: (429, "rate_limit_error"),
    ServiceUnavailable: (503, "service_unavailable_error"),
    GenerationFailed: (500, "server_error"),
    PhiserveError: (500, "server_error"),
}


def status_and_type(exc: PhiserveError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]  # type: ignore[index]
    return 500, "server_error"


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: PhiserveError) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, type_ = status_and_type(exc)
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return status, error_body(exc.message, type_, param=exc.param, code=exc.code), headers


def error_response(exc: PhiserveError) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def sse_error_event(exc: PhiserveError) -> str:
    """An error after the stream started: the status line is gone, so send the body."""
    _, body, _ = error_payload(exc)
    return f"data: {json.dumps(body)}\n\n"


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    # ('body', 'messages', 0, 'content') -> "messages[0].content"
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before", "union", "tagged-union"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def invalid_request_from(errors: Sequence[Any]) -> InvalidRequest:
    """pydantic/FastAPI validation errors -> one InvalidRequest naming the first field."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return InvalidRequest(message)
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return InvalidRequest("The request body is empty; send a JSON object")
    param = _validation_param(tuple(first.get("loc", ())))
    message = f"{param or 'request'}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return InvalidRequest(message, param=param)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(invalid_request_from(exc.errors()))


async def _on_phiserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PhiserveError)
    if exc.code == "tenancy_unavailable":
        # Counted here because it can come from any Redis step (auth, admission, usage).
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.rejected.inc(tags={"reason": "tenancy_unavailable"})
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
    return JSONResponse(error_body("internal server error", "server_error", code="internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(PhiserveError, _on_phiserve_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


# Documented in OpenAPI through each route's `responses=`.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (OpenAI error body; `param` names the field)"},
    401: {"description": "Missing, unknown or revoked API key"},
    403: {"description": "The key's tenant may not use this model or route"},
    404: {"description": "Unknown model"},
    413: {"description": "Request body too large"},
    429: {"description": "Tenant limit reached or queue timeout; see Retry-After and x-ratelimit-*"},
    503: {"description": "No live replica for the model; retry after `Retry-After` seconds"},
}


# gRPC's sibling of ERROR_TABLE (issue 5): the gRPC code is looked up by the row's HTTP
# status, so REST and gRPC cannot disagree about a class. 413 maps to RESOURCE_EXHAUSTED,
# the code gRPC itself gives a message over the size limit.
GRPC_CODE_BY_HTTP_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
}
ERROR_DOMAIN = "phiserve"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def grpc_status(exc: PhiserveError, *, field: str | None = None) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and rich `google.rpc.Status` of an error, from the same table as REST.

    Details: `ErrorInfo` (reason: the REST `code` in upper case; metadata: `code`, `type`,
    `param`), `BadRequest` naming `field` (the proto field path; REST's `param` if not
    given) for INVALID_ARGUMENT, and `RetryInfo` when the error has a retry delay.
    """
    http_status, type_ = status_and_type(exc)
    code = GRPC_CODE_BY_HTTP_STATUS.get(http_status, grpc.StatusCode.INTERNAL)
    reason = (exc.code or "internal_error").upper()
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    info.metadata.update({"code": exc.code or "", "type": type_, "param": exc.param or ""})
    details = [_packed(info)]
    field = field or exc.param
    if code is grpc.StatusCode.INVALID_ARGUMENT and field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=exc.message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    if exc.retry_after_s is not None:
        delay = duration_pb2.Duration(seconds=int(exc.retry_after_s))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=exc.message, details=details)
    return code, status

