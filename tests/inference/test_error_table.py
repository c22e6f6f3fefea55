"""The one error table: every phiserve error has a status, and bodies are OpenAI-shaped."""

from __future__ import annotations

import json

import pytest

from services.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
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
    UnsupportedContent,
)
from services.gateway.errors import sse_error_event
from services.inference.errors import error_payload
from tests.test_errors import ALL_ERRORS


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidRequest("x"), 400, "invalid_request_error"),
        (ContextLengthExceeded("x"), 400, "invalid_request_error"),
        (UnsupportedContent("x"), 400, "invalid_request_error"),
        (AuthenticationFailed("x"), 401, "authentication_error"),
        (PermissionDenied("x"), 403, "permission_error"),
        (ModelNotFound("x"), 404, "invalid_request_error"),
        (ResourceNotFound("x"), 404, "invalid_request_error"),
        (RateLimited("x"), 429, "rate_limit_error"),
        (Overloaded("x"), 429, "rate_limit_error"),
        (RequestTooLarge("x"), 413, "invalid_request_error"),
        (ServiceUnavailable("x"), 503, "service_unavailable_error"),
        (GenerationFailed("x"), 500, "server_error"),
    ],
)
def test_status_and_type(exc: PhiserveError, status: int, type_: str) -> None:
    got_status, body, _ = error_payload(exc)
    assert got_status == status
    assert body["error"]["type"] == type_


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_has_a_complete_body(cls: type[PhiserveError]) -> None:
    status, body, headers = error_payload(cls("message", param="p"))
    assert 400 <= status < 600
    assert body == {
        "error": {"message": "message", "type": body["error"]["type"], "param": "p", "code": cls.default_code}
    }
    client_errors = (
        InvalidRequest,
        AuthenticationFailed,
        PermissionDenied,
        ModelNotFound,
        ResourceNotFound,
        RequestTooLarge,
        RateLimited,
        Overloaded,
    )
    assert (status < 500) == issubclass(cls, client_errors)


def test_retry_after_header_only_when_set() -> None:
    assert error_payload(ServiceUnavailable("down"))[2] == {"Retry-After": "5"}
    assert error_payload(InvalidRequest("bad"))[2] == {}


def test_sse_error_event_carries_the_body() -> None:
    event = sse_error_event(ContextLengthExceeded("too long", param="max_tokens"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    payload = json.loads(event.removeprefix("data: "))
    assert payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["param"] == "max_tokens"
