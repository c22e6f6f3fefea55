"""A client that gives up cancels its request's handler (issue 9, item 3), on a real
uvicorn server: what the gateway's fair-queue waiters rely on to leave the queue."""

from __future__ import annotations

import asyncio

import httpx
import uvicorn
from fastapi import FastAPI

from services.gateway.disconnect import CancelOnDisconnect
from tests.conftest import free_port


async def test_client_that_gives_up_cancels_the_handler() -> None:
    cancelled = asyncio.Event()
    entered = asyncio.Event()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def queued(body: dict[str, object]) -> dict[str, str]:
        entered.set()
        try:
            await asyncio.sleep(30)  # waiting in the fair queue
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {"served": "too late"}

    app.add_middleware(CancelOnDisconnect, paths={"/v1/chat/completions"})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as probe:
            for _ in range(100):
                try:
                    await probe.get("/docs")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=0.5) as client:
            try:
                await client.post("/v1/chat/completions", json={"model": "m"})
            except httpx.TimeoutException:
                pass
        assert entered.is_set()
        await asyncio.wait_for(cancelled.wait(), 3)
    finally:
        server.should_exit = True
        await serving
