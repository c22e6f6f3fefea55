"""The edge rules REST and gRPC share: the presented API key and the request id.

Pure functions first, then each adapter applying them: the HTTP middleware (in-process
ASGI) and the gRPC servicer's per-call state (a fake context). No Ray."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from services.errors import TenancyUnavailable
from services.gateway.middleware import CLIENT_CLOSED_REQUEST, GatewayMiddleware
from services.grpc.servicer import InferenceServicer, _Call
from services.inference.identity import presented_key, request_id

FRESH = re.compile(r"[0-9a-f]{32}")


def _raw(*pairs: tuple[str, str]) -> Headers:
    """Starlette's view of an ASGI header list (names lower-cased by the server), as the
    middleware builds it."""
    return Headers(raw=[(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in pairs])


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer psk-1"}, "psk-1"),
        ({"authorization": "bearer psk-1"}, "psk-1"),  # the scheme is case-insensitive
        ({"authorization": "Bearer   psk-1  "}, "psk-1"),
        ({"api-key": "psk-2"}, "psk-2"),  # Azure OpenAI clients
        ({"authorization": "Bearer psk-1", "api-key": "psk-2"}, "psk-1"),
        # An Authorization header that presents no bearer token hides api-key: no key.
        ({"authorization": "Basic psk-1", "api-key": "psk-2"}, None),
        ({"authorization": "Bearer ", "api-key": "psk-2"}, None),
        ({"authorization": "Bearer"}, None),
        ({"x-api-key": "psk-3"}, None),  # not a header the API reads
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key  # gRPC metadata: a dict with lower-case keys
    assert presented_key(_raw(*headers.items())) == key  # HTTP headers


def test_presented_key_reads_http_header_names_in_any_case() -> None:
    assert presented_key(_raw(("Authorization", "Bearer psk-1"))) == "psk-1"
    assert presented_key(_raw(("API-Key", "psk-2"))) == "psk-2"


@pytest.mark.parametrize(
    "candidate", ["abc", "req-1.2:3_4", "A" * 128, "0123456789abcdef0123456789abcdef"]
)
def test_a_safe_request_id_is_kept(candidate: str) -> None:
    assert request_id({"x-request-id": candidate}) == candidate
    assert request_id(_raw(("X-Request-Id", candidate))) == candidate


@pytest.mark.parametrize(
    "candidate",
    ["", "A" * 129, "has space", "a/b", "a,b", "semi;colon", "é", "line\n", "tab\there", "<script>"],
)
def test_an_unsafe_request_id_is_replaced_by_a_fresh_one(candidate: str) -> None:
    replaced = request_id({"x-request-id": candidate})
    assert replaced != candidate and FRESH.fullmatch(replaced)


def test_a_missing_request_id_is_server_generated_and_unique() -> None:
    ids = {request_id({}) for _ in range(100)}
    assert len(ids) == 100 and all(FRESH.fullmatch(i) for i in ids)


def test_the_first_of_repeated_http_request_ids_counts() -> None:
    assert request_id(_raw(("x-request-id", "first"), ("x-request-id", "second"))) == "first"
    bad_first = request_id(_raw(("x-request-id", "bad id"), ("x-request-id", "second")))
    assert FRESH.fullmatch(bad_first)


# -- the adapters use these rules -----------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append(dict(tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(dict(tags or {}))


class _Metrics:
    def __init__(self) -> None:
        self.requests = _Counter()
        self.request_duration = _Counter()
        self.rejected = _Counter()


class _Tenants:
    """Records the key the middleware presents; Redis is 'down' for one key."""

    def __init__(self) -> None:
        self.presented: list[str | None] = []

    async def authenticate(self, key: str | None, *, checked_at_admission: bool = False) -> tuple[Any, Any]:
        self.presented.append(key)
        if key == "redis-down":
            raise TenancyUnavailable("tenant state is unavailable (Redis); retry shortly", retry_after_s=2)
        return SimpleNamespace(id="t", metrics_label=False), None


def _middleware(seen: dict[str, Any]) -> tuple[GatewayMiddleware, _Metrics, _Tenants]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["request_id"] = scope["state"]["request_id"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    metrics, tenants = _Metrics(), _Tenants()
    middleware = GatewayMiddleware(
        app,
        max_body_bytes=1024,
        max_upload_bytes=1024,
        max_json_body_bytes=1024,
        metrics=metrics,  # type: ignore[arg-type]
        tenants=tenants,  # type: ignore[arg-type]
    )
    return middleware, metrics, tenants


async def test_http_middleware_applies_the_rules() -> None:
    seen: dict[str, Any] = {}
    middleware, metrics, tenants = _middleware(seen)
    transport = httpx.ASGITransport(app=middleware)  # type: ignore[arg-type]  # ASGI by duck type
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.get("/v1/usage", headers={"x-request-id": "client-7", "api-key": "psk-2"})
        assert seen["request_id"] == "client-7"
        await client.get("/v1/usage", headers={"x-request-id": "bad id", "authorization": "Bearer psk-1"})
        assert FRESH.fullmatch(seen["request_id"])
        down = await client.get("/v1/usage", headers={"authorization": "Bearer redis-down"})
    assert tenants.presented == ["psk-2", "psk-1", "redis-down"]
    assert down.status_code == 503 and down.json()["error"]["code"] == "tenancy_unavailable"
    assert metrics.rejected.calls == [{"reason": "tenancy_unavailable"}]
    assert CLIENT_CLOSED_REQUEST == 499


class _Context:
    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata


async def test_grpc_servicer_applies_the_rules() -> None:
    tenants = _Tenants()
    core = SimpleNamespace(tenants=tenants, metrics=_Metrics())
    servicer = InferenceServicer(core, SimpleNamespace(files=None, batches=None))  # type: ignore[arg-type]
    kept = _Call(_Context((("x-request-id", "client-7"), ("api-key", "psk-2"))), "Chat")  # type: ignore[arg-type]
    fresh = _Call(_Context((("x-request-id", "bad id"), ("authorization", "Basic x"))), "Chat")  # type: ignore[arg-type]
    await servicer._tenant(kept)
    await servicer._tenant(fresh)
    assert kept.request_id == "client-7" and FRESH.fullmatch(fresh.request_id)
    assert tenants.presented == ["psk-2", None]
    # Binary metadata is not a header the rules read.
    binary = _Call(_Context((("x-request-id-bin", b"\x00"),)), "Chat")  # type: ignore[arg-type]
    assert FRESH.fullmatch(binary.request_id)
