"""Plain ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming).

* `x-request-id`: Serve's own request-id middleware echoes or generates the header
  (in every proxy mode); the id the routes use (`scope["state"]["request_id"]`,
  response ids, logs) is that header when it is a safe token, a fresh one otherwise.
* Body limit: a request whose body exceeds the limit gets 413 before it is parsed,
  whether it declares a Content-Length or streams chunks.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.errors import error_body
from services.gateway.metrics import GatewayMetrics

Scope = dict[str, Any]
Message = dict[str, Any]

CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that went away mid-response
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it (it turns other
    # errors while reading into a generic 400) and the error table renders 413.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes")


# The API paths whose requests are counted (a bounded `endpoint` label); probes and
# admin calls are not.
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/usage", "/v1/files", "/v1/batches"}
UPLOAD_PATH = "/v1/files"


class GatewayMiddleware:
    def __init__(self, app: Any, *, max_body_bytes: int, max_upload_bytes: int, metrics: GatewayMetrics) -> None:
        self._app = app
        self._max_body_bytes = max_body_bytes
        self._max_upload_bytes = max_upload_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = _request_id(scope)
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
        # Batch input files are larger than any single request (the multipart envelope
        # adds a little to the file limit, which FileService enforces exactly).
        limit = self._max_upload_bytes + 64 * 1024 if scope.get("path") == UPLOAD_PATH else self._max_body_bytes

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            state["status"] = 413
            await _send_too_large(send, limit)
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


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID_OK.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_too_large(send: Any, limit: int) -> None:
    body = json.dumps(
        error_body(
            f"The request body is larger than the limit of {limit} bytes",
            "invalid_request_error",
            code="request_too_large",
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
