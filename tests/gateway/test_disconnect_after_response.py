"""The disconnect a server reports once the response is complete is no client leaving.

uvicorn (and httpx's ASGITransport) answer `receive()` with `http.disconnect` as soon as
the last body byte is sent. A streaming handler is still closing its task group then;
`CancelOnDisconnect` used to cancel it, so a stream that was answered in full raised
CancelledError out of the app and was counted as a 499. Found by the in-process gateway
tests (tests/gateway/test_inprocess_app.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.gateway.disconnect import CancelOnDisconnect

PATH = "/v1/chat/completions"


class Server:
    """The server side of one request, as uvicorn behaves: the body, then a disconnect once
    the response is complete (or once the client leaves, on `leave()`)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._body_given = False
        self._closed = asyncio.Event()

    def leave(self) -> None:
        self._closed.set()

    async def receive(self) -> dict[str, Any]:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self._closed.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._closed.set()


async def test_a_handler_still_closing_after_its_last_byte_is_not_cancelled() -> None:
    finished = asyncio.Event()

    async def streaming_handler(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        for _ in range(5):  # a task group winding down takes a few loop turns
            await asyncio.sleep(0)
        finished.set()

    server = Server()
    app = CancelOnDisconnect(streaming_handler, paths={PATH})
    await asyncio.wait_for(app({"type": "http", "path": PATH}, server.receive, server.send), 5)
    assert finished.is_set()


async def test_a_client_that_leaves_mid_response_still_cancels_the_handler() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def slow_handler(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = Server()
    app = CancelOnDisconnect(slow_handler, paths={PATH})
    call = asyncio.ensure_future(app({"type": "http", "path": PATH}, server.receive, server.send))
    await asyncio.wait_for(started.wait(), 5)
    server.leave()
    try:
        await asyncio.wait_for(call, 5)
    except asyncio.CancelledError:
        pass
    assert cancelled.is_set()
