"""The one error table: each phiserve error class -> HTTP status, OpenAI error `type` and
gRPC status code, side by side, and the OpenAI error body, for every adapter (REST, SSE,
gRPC, batch output lines).

The HTTP adapter turns these into responses (services/gateway/errors.py), the gRPC adapter
into its status and rich details (services/grpc/errors.py), the batch worker into error-file
lines (`batch_error_line`); none decides a status of its own. The gRPC code is a name of
`grpc.StatusCode` so that the core does not import grpc.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from services.errors import (
    AuthenticationFailed,
    ClientClosedRequest,
    ContextLengthExceeded,
    GenerationFailed,
    InvalidAdapter,
    InvalidRequest,
    ModelNotFound,
    NoLiveReplica,
    Overloaded,
    PermissionDenied,
    PhiserveError,
    RateLimited,
    RequestTooLarge,
    ResourceNotFound,
    ServiceUnavailable,
    TenancyUnavailable,
    UnsupportedContent,
)

GrpcCodeName = Literal[
    "CANCELLED",
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
]


class ErrorRow(NamedTuple):
    http_status: int
    openai_type: str
    grpc_code: GrpcCodeName


# Every class of the tree in services/errors.py has its row (a test holds the table to the
# tree); lookup walks the MRO, so a subclass defined elsewhere gets its parent's row.
# 413 is RESOURCE_EXHAUSTED, the code gRPC itself gives a message over its size limit.
# 499 (nginx's "client closed request") is never sent: it labels metrics and logs.
ERROR_TABLE: dict[type[PhiserveError], ErrorRow] = {
    InvalidRequest: ErrorRow(400, "invalid_request_error", "INVALID_ARGUMENT"),
    ContextLengthExceeded: ErrorRow(400, "invalid_request_error", "INVALID_ARGUMENT"),
    UnsupportedContent: ErrorRow(400, "invalid_request_error", "INVALID_ARGUMENT"),
    InvalidAdapter: ErrorRow(400, "invalid_request_error", "INVALID_ARGUMENT"),
    AuthenticationFailed: ErrorRow(401, "authentication_error", "UNAUTHENTICATED"),
    PermissionDenied: ErrorRow(403, "permission_error", "PERMISSION_DENIED"),
    ModelNotFound: ErrorRow(404, "invalid_request_error", "NOT_FOUND"),
    ResourceNotFound: ErrorRow(404, "invalid_request_error", "NOT_FOUND"),
    RequestTooLarge: ErrorRow(413, "invalid_request_error", "RESOURCE_EXHAUSTED"),
    ClientClosedRequest: ErrorRow(499, "invalid_request_error", "CANCELLED"),
    RateLimited: ErrorRow(429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    Overloaded: ErrorRow(429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    ServiceUnavailable: ErrorRow(503, "service_unavailable_error", "UNAVAILABLE"),
    TenancyUnavailable: ErrorRow(503, "service_unavailable_error", "UNAVAILABLE"),
    NoLiveReplica: ErrorRow(503, "service_unavailable_error", "UNAVAILABLE"),
    GenerationFailed: ErrorRow(500, "server_error", "INTERNAL"),
    PhiserveError: ErrorRow(500, "server_error", "INTERNAL"),
}


def error_row(error: PhiserveError | type[PhiserveError]) -> ErrorRow:
    """The row of an error (or error class): its own, else its nearest ancestor's."""
    cls = error if isinstance(error, type) else type(error)
    for ancestor in cls.__mro__:
        row = ERROR_TABLE.get(ancestor)
        if row is not None:
            return row
    return ERROR_TABLE[PhiserveError]


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: PhiserveError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and headers (Retry-After) of an error."""
    row = error_row(exc)
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    body = error_body(exc.message, row.openai_type, param=exc.param, code=exc.code)
    return row.http_status, body, headers


def batch_error_line(item_id: str, custom_id: str, exc: PhiserveError) -> dict[str, Any]:
    """A line of a batch's error file: the status and body REST would answer for the item,
    and OpenAI's top-level `error` summary (code, message)."""
    status, body, _ = error_payload(exc)
    return {
        "id": item_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": item_id, "body": body},
        "error": {"code": exc.code, "message": exc.message},
    }


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
