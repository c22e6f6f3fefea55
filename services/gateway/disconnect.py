"""A client that leaves cancels its request (issue 9, item 3).

Serve's direct ingress is meant to cancel a request whose client disconnected, but the
cancel did not reach our handlers while they waited in the fair queue: seen on the test
cluster, HTTP clients that gave up while queued kept their waiters alive (renewing their
tickets) until `queue_timeout_s`, and were then granted a slot to generate for nobody.
HAProxy does close the replica's connection (uvicorn then answers `receive()` with
`http.disconnect`), so the gateway watches for that itself.

Once the request body has been read, this middleware owns `receive`: a watcher waits for
`http.disconnect` and cancels the handler, which then leaves the fair queue, closes the
engine request and settles like any cancelled request (the metrics record 499). Later
calls of the app's `receive` get the disconnect, as the ASGI spec says.
"""

from __future__ import annotations

import asyncio
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class CancelOnDisconnect:
    def __init__(self, app: Any, *, paths: set[str]) -> None:
        self._app = app
        self._paths = paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in self._paths:
            await self._app(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()

        async def app_receive() -> Message:
            if body_read.is_set():  # the watcher reads from here on
                await gone.wait()
                return {"type": "http.disconnect"}
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        # The server reports http.disconnect also once the response is complete (uvicorn,
        # httpx's ASGITransport): then no client left, and a stream's handler, still closing
        # its task group, must not be cancelled (it was counted as a 499).
        answered = False

        async def app_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        handler = asyncio.ensure_future(self._app(scope, app_receive, app_send))

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not answered:
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler  # a cancel of this task also cancels the handler
        finally:
            watcher.cancel()
