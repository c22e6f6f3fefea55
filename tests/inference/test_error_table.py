"""The one error table: every class of the tree has its HTTP status, OpenAI type and gRPC
code side by side, and REST bodies, SSE events, gRPC statuses and batch error lines all come
from it. In-process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi import FastAPI
from google.rpc import error_details_pb2

import services.errors
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
from services.gateway.errors import count_redis_down, install_error_handlers, sse_error_event
from services.gateway.middleware import GatewayMiddleware
from services.grpc.errors import grpc_status
from services.inference.errors import ERROR_TABLE, batch_error_line, error_payload, error_row
from tests.test_errors import ALL_ERRORS

REPO = Path(__file__).resolve().parents[2]
Code = grpc.StatusCode

# What a client sees for each class: HTTP status, OpenAI `type`, gRPC code. Written out
# here, not derived from the table, so a changed row fails a test.
EXPECTED: dict[type[PhiserveError], tuple[int, str, grpc.StatusCode]] = {
    PhiserveError: (500, "server_error", Code.INTERNAL),
    InvalidRequest: (400, "invalid_request_error", Code.INVALID_ARGUMENT),
    ContextLengthExceeded: (400, "invalid_request_error", Code.INVALID_ARGUMENT),
    UnsupportedContent: (400, "invalid_request_error", Code.INVALID_ARGUMENT),
    InvalidAdapter: (400, "invalid_request_error", Code.INVALID_ARGUMENT),
    AuthenticationFailed: (401, "authentication_error", Code.UNAUTHENTICATED),
    PermissionDenied: (403, "permission_error", Code.PERMISSION_DENIED),
    ModelNotFound: (404, "invalid_request_error", Code.NOT_FOUND),
    ResourceNotFound: (404, "invalid_request_error", Code.NOT_FOUND),
    RequestTooLarge: (413, "invalid_request_error", Code.RESOURCE_EXHAUSTED),
    ClientClosedRequest: (499, "invalid_request_error", Code.CANCELLED),
    RateLimited: (429, "rate_limit_error", Code.RESOURCE_EXHAUSTED),
    Overloaded: (429, "rate_limit_error", Code.RESOURCE_EXHAUSTED),
    ServiceUnavailable: (503, "service_unavailable_error", Code.UNAVAILABLE),
    TenancyUnavailable: (503, "service_unavailable_error", Code.UNAVAILABLE),
    NoLiveReplica: (503, "service_unavailable_error", Code.UNAVAILABLE),
    GenerationFailed: (500, "server_error", Code.INTERNAL),
}
CLIENT_ERRORS = (
    InvalidRequest,
    AuthenticationFailed,
    PermissionDenied,
    ModelNotFound,
    ResourceNotFound,
    RequestTooLarge,
    ClientClosedRequest,
    RateLimited,
    Overloaded,
)


def test_every_class_of_the_tree_has_its_own_row() -> None:
    assert set(EXPECTED) == set(ALL_ERRORS), "a new error class needs a row here and in ERROR_TABLE"
    assert set(ERROR_TABLE) == set(ALL_ERRORS)


def test_the_drawn_tree_names_every_class() -> None:
    drawing = services.errors.__doc__ or ""
    for cls in ALL_ERRORS:
        assert f" {cls.__name__} " in drawing, cls.__name__
        parent = cls.__mro__[1]
        if parent is not Exception:
            # Drawn under its parent: the parent's line comes first.
            assert drawing.index(f" {parent.__name__} ") < drawing.index(f" {cls.__name__} ")


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_http_status_openai_type_and_grpc_code(cls: type[PhiserveError]) -> None:
    status, type_, grpc_code = EXPECTED[cls]
    exc = cls("message", param="p")
    got_status, body, _ = error_payload(exc)
    assert (got_status, body["error"]["type"]) == (status, type_)
    code, rich = grpc_status(exc)
    assert code is grpc_code
    assert rich.code == grpc_code.value[0]
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.metadata["type"] == type_ and info.metadata["code"] == (cls.default_code or "")
    assert error_row(cls) == error_row(exc)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_has_a_complete_body(cls: type[PhiserveError]) -> None:
    status, body, _ = error_payload(cls("message", param="p"))
    assert 400 <= status < 600
    assert body == {
        "error": {"message": "message", "type": body["error"]["type"], "param": "p", "code": cls.default_code}
    }
    assert (status < 500) == issubclass(cls, CLIENT_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda cls: cls.__name__)
def test_batch_error_line_is_what_rest_answers(cls: type[PhiserveError]) -> None:
    exc = cls("not run", param="p", retry_after_s=3)
    status, body, _ = error_payload(exc)
    line = batch_error_line("batch_1-4", "req-4", exc)
    assert line == {
        "id": "batch_1-4",
        "custom_id": "req-4",
        "response": {"status_code": EXPECTED[cls][0], "request_id": "batch_1-4", "body": body},
        "error": {"code": cls.default_code, "message": "not run"},
    }
    assert status == EXPECTED[cls][0]
    json.dumps(line)  # stored as JSON in Redis and the error file


def test_batch_error_line_of_an_unknown_model_is_unchanged() -> None:
    # The exact line the batch service wrote before the table produced it.
    line = batch_error_line("b-0", "c", ModelNotFound("The model 'gpt-x' does not exist", param="model"))
    assert line == {
        "id": "b-0",
        "custom_id": "c",
        "response": {
            "status_code": 404,
            "request_id": "b-0",
            "body": {
                "error": {
                    "message": "The model 'gpt-x' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        },
        "error": {"code": "model_not_found", "message": "The model 'gpt-x' does not exist"},
    }


def test_a_subclass_outside_the_tree_inherits_its_parents_row() -> None:
    class PoolDraining(ServiceUnavailable):
        default_code = "pool_draining"

    assert error_row(PoolDraining("x")) == ERROR_TABLE[ServiceUnavailable]
    assert grpc_status(PoolDraining("x"))[0] is Code.UNAVAILABLE


def test_explicit_code_keeps_the_class_row() -> None:
    status, body, _ = error_payload(PermissionDenied("no", code="model_not_allowed", param="model"))
    assert (status, body["error"]["code"], body["error"]["type"]) == (403, "model_not_allowed", "permission_error")


def test_retry_after_header_only_when_set() -> None:
    assert error_payload(ServiceUnavailable("down"))[2] == {"Retry-After": "5"}
    assert error_payload(TenancyUnavailable("redis", retry_after_s=2))[2] == {"Retry-After": "2"}
    assert error_payload(InvalidRequest("bad"))[2] == {}


def test_sse_error_event_carries_the_body() -> None:
    event = sse_error_event(ContextLengthExceeded("too long", param="max_tokens"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    payload = json.loads(event.removeprefix("data: "))
    assert payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["param"] == "max_tokens"


def test_no_hand_written_error_body_outside_the_table() -> None:
    writers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "services").rglob("*.py")
        if '"error": {' in path.read_text()
    )
    assert writers == ["services/inference/errors.py"]


class _Counter:
    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(dict(tags or {}))


    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(dict(tags or {}))


class _Metrics:
    def __init__(self) -> None:
        self.rejected = _Counter()
        self.requests = _Counter()
        self.request_duration = _Counter()


def test_redis_down_is_counted_by_type_not_by_code() -> None:
    metrics = _Metrics()
    count_redis_down(metrics, TenancyUnavailable("redis down"))  # type: ignore[arg-type]
    count_redis_down(metrics, ServiceUnavailable("no replica"))  # type: ignore[arg-type]
    # The code string alone no longer decides: only the Redis boundary's type is counted.
    count_redis_down(metrics, ServiceUnavailable("x", code="tenancy_unavailable"))  # type: ignore[arg-type]
    count_redis_down(None, TenancyUnavailable("no metrics yet"))
    assert metrics.rejected.calls == [{"reason": "tenancy_unavailable"}]


async def test_http_handler_answers_and_counts_redis_down() -> None:
    app = FastAPI()
    install_error_handlers(app)
    metrics = _Metrics()
    app.state.metrics = metrics

    @app.get("/tenancy")
    async def tenancy() -> None:
        raise TenancyUnavailable("tenant state is unavailable (Redis); retry shortly", retry_after_s=2)

    @app.get("/replica")
    async def replica() -> None:
        raise ServiceUnavailable("no live replica")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        down = await client.get("/tenancy")
        other = await client.get("/replica")
    assert down.status_code == 503 and down.headers["retry-after"] == "2"
    assert down.json() == {
        "error": {
            "message": "tenant state is unavailable (Redis); retry shortly",
            "type": "service_unavailable_error",
            "param": None,
            "code": "tenancy_unavailable",
        }
    }
    assert other.status_code == 503 and other.json()["error"]["code"] == "service_unavailable"
    assert metrics.rejected.calls == [{"reason": "tenancy_unavailable"}]


async def test_http_adapters_own_errors_are_table_rows() -> None:
    """A body over the limit (refused by the middleware before it is read) and an unexpected
    exception: the same bytes as before the table produced them."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/usage")
    async def crash() -> None:
        raise RuntimeError("boom")

    middleware = GatewayMiddleware(
        app, max_body_bytes=8, max_upload_bytes=8, max_json_body_bytes=8, metrics=_Metrics()  # type: ignore[arg-type]
    )
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        too_large = await client.post("/v1/usage", content=b"x" * 9)
        crashed = await client.post("/v1/usage", content=b"{}")
    assert too_large.status_code == 413
    assert too_large.json() == {
        "error": {
            "message": "The request body is larger than the limit of 8 bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
    assert crashed.status_code == 500 and "retry-after" not in crashed.headers
    assert crashed.json() == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }


def test_grpc_code_names_are_grpc_status_codes() -> None:
    # The core stores names so that it does not import grpc; each must be a real code.
    assert {row.grpc_code for row in ERROR_TABLE.values()} <= set(Code.__members__)
