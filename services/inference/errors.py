"""The one error table: phiserve errors -> HTTP status, OpenAI error `type`, and the OpenAI
error body, for every adapter (REST, SSE, gRPC, batch output lines).

The HTTP adapter turns these into responses (services/gateway/errors.py), the gRPC adapter
into status codes (services/grpc/errors.py); neither decides a status of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: PhiserveError) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, type_ = status_and_type(exc)
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return status, error_body(exc.message, type_, param=exc.param, code=exc.code), headers


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
