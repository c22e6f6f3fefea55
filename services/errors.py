"""The phiserve exception hierarchy, shared by the gateway and the model pools.

    PhiserveError                       base; carries message, param, code, headers
     ├── InvalidRequest                 the client's request is wrong (400)
     │    ├── ContextLengthExceeded     prompt + max_tokens beyond the pool's context
     │    ├── UnsupportedContent        e.g. an image sent to a text-only model
     │    └── InvalidAdapter            a LoRA adapter's files fail validation
     ├── AuthenticationFailed           missing, unknown or revoked API key (401)
     ├── PermissionDenied               the key may not do this (403)
     ├── ModelNotFound                  no pool serves that model name (404)
     ├── ResourceNotFound               no such tenant/key/file/batch *for this caller* (404)
     ├── RequestTooLarge                body over the configured limit (413)
     ├── ClientClosedRequest            the client left before the answer (499, never sent)
     ├── RateLimited                    a tenant limit refused the request (429, Retry-After)
     ├── Overloaded                     waited too long in the fair queue (429, Retry-After)
     ├── ServiceUnavailable             a replica died on the request / engine dead (503, Retry-After)
     │    ├── TenancyUnavailable        Redis (tenant state, queue) did not answer
     │    └── NoLiveReplica             no replica took the request in time: nothing ran
     └── GenerationFailed               the engine failed on a valid request (500)

Errors raised in a pool replica cross the Ray handle to the gateway, so each one
pickles by its constructor arguments (`__reduce__`). Lower-layer errors (vLLM, Ray, Redis)
are translated into these once, at the boundary where they are caught, with
`raise X(...) from exc`. What each class means on the wire (HTTP status, OpenAI error
`type`, gRPC code) is one table, `services.inference.errors.ERROR_TABLE`.
"""

from __future__ import annotations

from typing import Any


class PhiserveError(Exception):
    """Base of every error phiserve raises on purpose."""

    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive Exception's default pickling, and
        # these errors cross a Ray handle from pool replica to gateway.
        return (
            _rebuild,
            (type(self), self.message, self.param, self.code, self.retry_after_s, self.headers),
        )


def _rebuild(
    cls: type[PhiserveError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: int | None,
    headers: dict[str, str],
) -> PhiserveError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s, headers=headers)


class InvalidRequest(PhiserveError):
    default_code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class UnsupportedContent(InvalidRequest):
    default_code = "unsupported_content"


class InvalidAdapter(InvalidRequest):
    """A LoRA adapter's folder or files are unusable (services/pools/adapter_files.py)."""

    default_code = "invalid_adapter"


class AuthenticationFailed(PhiserveError):
    default_code = "invalid_api_key"


class PermissionDenied(PhiserveError):
    default_code = "permission_denied"


class ModelNotFound(PhiserveError):
    default_code = "model_not_found"


class ResourceNotFound(PhiserveError):
    default_code = "not_found"


class RequestTooLarge(PhiserveError):
    default_code = "request_too_large"


class ClientClosedRequest(PhiserveError):
    """The client went away (disconnect, cancelled RPC) before its answer was complete.

    Nobody reads the answer; the status exists for metrics and logs, as nginx's 499."""

    default_code = "client_closed_request"


class RateLimited(PhiserveError):
    default_code = "rate_limit_exceeded"


class Overloaded(PhiserveError):
    default_code = "overloaded"


class ServiceUnavailable(PhiserveError):
    default_code = "service_unavailable"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = 5,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after_s=retry_after_s, headers=headers)


class TenancyUnavailable(ServiceUnavailable):
    """Redis did not answer (raised only by services.redis_store.client); auth and
    admission fail closed, and the gateway counts it as a refusal of its own."""

    default_code = "tenancy_unavailable"


class NoLiveReplica(ServiceUnavailable):
    """No replica of the pool took the request in time (none is running: it is starting, or
    its node is gone). Nothing ran, so a batch item waits for one without spending a try."""

    default_code = "no_live_replica"


class GenerationFailed(PhiserveError):
    default_code = "generation_failed"


__all__ = [
    "AuthenticationFailed",
    "ClientClosedRequest",
    "ContextLengthExceeded",
    "GenerationFailed",
    "InvalidAdapter",
    "InvalidRequest",
    "ModelNotFound",
    "NoLiveReplica",
    "Overloaded",
    "PermissionDenied",
    "PhiserveError",
    "RateLimited",
    "RequestTooLarge",
    "ResourceNotFound",
    "ServiceUnavailable",
    "TenancyUnavailable",
    "UnsupportedContent",
]
