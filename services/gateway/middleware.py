"""Plain ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks streaming).

* `x-request-id`: Serve's own request-id middleware echoes or generates the header
  (in every proxy mode); the id the routes use (`scope["state"]["request_id"]`,
  response ids, logs) is that header when it is a safe token, a fresh one otherwise.
* Body limit: a request whose body exceeds the limit gets 413 before it is parsed,
  whether it declares a Content-Length or streams chunks.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException so that FastAPI's body reader re-raises it (it turns other
    # errors while reading into a generic 400) and the error table renders 413.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes")


class GatewayMiddleware:
    def __init__(self, app: Any, *, max_body_bytes: int) -> None:
        self._app = app
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self._max_body_bytes

        declared = _content_length(scope)
        if declared is not None and declared > limit:
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
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
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
