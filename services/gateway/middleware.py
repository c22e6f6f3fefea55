"""Plain ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming).

* `x-request-id`: Serve's own request-id middleware echoes or generates the header
  (in every proxy mode); the id the routes use (`scope["state"]["request_id"]`,
  response ids, logs) is that header when it is a safe token, a fresh one otherwise
  (`services.inference.identity.request_id`, the rule gRPC uses too).
* Body limits, per route: generations (base64 images) get `max_request_body_bytes`, a
  batch file upload `max_batch_file_bytes`, every other route the small
  `max_json_body_bytes`. A larger body gets 413 before it is parsed, whether it declares a
  Content-Length or streams chunks.
* Authentication first (issue 9, item 4): on the tenant routes (/v1/*, except the public
  model list, and /tokenize, /detokenize) the API key is resolved to its tenant before a byte of the body is read, so
  an unauthenticated client gets its 401 without the gateway reading, parsing or spooling
  anything. The tenant rides on `scope["state"]["tenant"]` to the route's dependency
  (services/gateway/deps.py), which does not look it up again. Admin routes keep their
  own admin-key dependency.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import ClientClosedRequest, PhiserveError, RequestTooLarge
from services.gateway.errors import count_redis_down
from services.inference.errors import error_payload, error_row
from services.inference.identity import presented_key, request_id
from services.inference.metrics import GatewayMetrics
from services.tenancy.store import TenantStore

Scope = dict[str, Any]
Message = dict[str, Any]

# nginx's 499, from the error table: the status the metrics record for a client that left.
CLIENT_CLOSED_REQUEST = error_row(ClientClosedRequest).http_status


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it (it turns other
    # errors while reading into a generic 400) and the error table renders 413.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes")


# The API paths whose requests are counted (a bounded `endpoint` label); probes and
# admin calls are not.
# vLLM's tokenizer routes sit outside /v1/ (phiserve serves them under /v1/ too); a tenant's.
TOKENIZER_PATHS = {"/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"}
ENDPOINTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/usage",
    "/v1/files",
    "/v1/batches",
    *TOKENIZER_PATHS,
}
UPLOAD_PATH = "/v1/files"
GENERATION_PATHS = {"/v1/chat/completions", "/v1/completions"}
TENANT_PREFIX = "/v1/"
PUBLIC_PATHS = {"/v1/models"}  # the model list is public, like /health
MULTIPART_ENVELOPE_BYTES = 64 * 1024


class GatewayMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        max_json_body_bytes: int,
        metrics: GatewayMetrics,
        tenants: TenantStore | None = None,
    ) -> None:
        """`tenants`: authenticate tenant routes before their body (None: leave it to the routes)."""
        self._app = app
        self._max_body_bytes = max_body_bytes
        self._max_upload_bytes = max_upload_bytes
        self._max_json_body_bytes = max_json_body_bytes
        self._metrics = metrics
        self._tenants = tenants

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id(Headers(scope=scope))
        state["started"] = started
        labels = state["metric_labels"] = {"model": "none", "tenant": "none"}
        status = 500
        try:
            await self._handle(scope, receive, send)
        except asyncio.CancelledError:
            state["status"] = CLIENT_CLOSED_REQUEST
            raise
        finally:
            path = scope.get("path", "")
            if path in ENDPOINTS:
                status = state.get("status", status)
                self._metrics.requests.inc(tags={**labels, "status": str(status)})
                self._metrics.request_duration.observe(
                    time.perf_counter() - started,
                    tags={"model": labels["model"], "endpoint": path},
                )

    async def _handle(self, scope: Scope, receive: Any, send: Any) -> None:
        state = scope["state"]
        limit = self._body_limit(scope.get("path", ""))

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            state["status"] = 413
            await _send_too_large(send, limit)
            return
        if self._tenants is not None and is_tenant_route(scope.get("path", "")):
            try:
                state["tenant"], _ = await self._tenants.authenticate(
                    presented_key(Headers(scope=scope)),
                    # A generation's admission checks a cached key's auth version (enter.lua).
                    checked_at_admission=scope.get("path", "") in GENERATION_PATHS,
                )
            except PhiserveError as exc:
                # Answered without reading the body; the server discards what follows.
                count_redis_down(self._metrics, exc)
                state["status"] = await _send_error(send, exc)
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                state["status"] = message["status"]
            await send(message)

        try:
            await self._app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                state["status"] = 413
                await _send_too_large(send, limit)

    def _body_limit(self, path: str) -> int:
        if path in GENERATION_PATHS:
            return self._max_body_bytes
        if path == UPLOAD_PATH:
            # The multipart envelope adds a little to the file, which FileService limits exactly.
            return self._max_upload_bytes + MULTIPART_ENVELOPE_BYTES
        return self._max_json_body_bytes


def is_tenant_route(path: str) -> bool:
    """A route of a tenant's key (authenticated here, and documented so in OpenAPI)."""
    return (path.startswith(TENANT_PREFIX) and path not in PUBLIC_PATHS) or path in TOKENIZER_PATHS


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Any, exc: PhiserveError) -> int:
    status, body, headers = error_payload(exc)
    await _send_json(send, status, body, headers)
    return status


async def _send_json(send: Any, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
    body = json.dumps(payload).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_too_large(send: Any, limit: int) -> None:
    await _send_error(send, RequestTooLarge(f"The request body is larger than the limit of {limit} bytes"))
