"""gRPC status codes and rich `google.rpc.Status` details from the core's error table."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.errors import PhiserveError
from services.inference.errors import error_row

ERROR_DOMAIN = "phiserve"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def grpc_status(exc: PhiserveError, *, field: str | None = None) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and rich `google.rpc.Status` of an error: the code is the row's in the
    core's table (`ERROR_TABLE`), beside REST's status, so the two cannot disagree.

    Details: `ErrorInfo` (reason: the REST `code` in upper case; metadata: `code`, `type`,
    `param`), `BadRequest` naming `field` (the proto field path; REST's `param` if not
    given) for INVALID_ARGUMENT, and `RetryInfo` when the error has a retry delay.
    """
    row = error_row(exc)
    code = grpc.StatusCode[row.grpc_code]
    reason = (exc.code or "internal_error").upper()
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    info.metadata.update({"code": exc.code or "", "type": row.openai_type, "param": exc.param or ""})
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
