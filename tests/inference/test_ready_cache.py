"""A flood of unauthenticated GET /ready does not reach the pools (issue 9, item 9).

The real /ready route and PoolRouter, in-process; each pool's Serve handle is a stand-in
that counts the `ready()` round trips it receives (the gateway logic under test is the
caching, not the pools).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
from fastapi import FastAPI

from services.catalog.loader import load_catalog
from services.gateway.models.router import router as models_router
from services.inference.readiness import Readiness
from services.inference.router import PoolRouter


class CountingHandle:
    def __init__(self, *, healthy: bool = True) -> None:
        self.calls = 0
        self.healthy = healthy
        self.ready = SimpleNamespace(remote=self._ready)

    def options(self, **_: Any) -> CountingHandle:
        return self

    async def _ready(self) -> bool:
        self.calls += 1
        await asyncio.sleep(0.05)  # a round trip takes a while: concurrent probes overlap
        if not self.healthy:
            raise RuntimeError("no replica")
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(handles: dict[str, CountingHandle], clock: Clock) -> FastAPI:
    catalog = load_catalog("local")
    router = PoolRouter(catalog, handles, assign_timeout_s=1.0)
    services = SimpleNamespace(
        catalog=catalog,
        router=router,
        batch_worker=None,
        readiness=Readiness(router, catalog.enabled_pools, ttl_s=1.0, clock=clock),
    )
    app = FastAPI()
    app.state.core = services
    app.include_router(models_router)
    return app


async def test_a_flood_of_ready_calls_reaches_each_pool_once_per_second() -> None:
    catalog = load_catalog("local")
    handles = {pool.name: CountingHandle() for pool in catalog.enabled_pools}
    clock = Clock()
    transport = httpx.ASGITransport(app=_app(handles, clock))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        answers = await asyncio.gather(*(client.get("/ready") for _ in range(200)))
        assert {a.status_code for a in answers} == {200}
        assert [h.calls for h in handles.values()] == [1] * len(handles)
        # Within the second: still cached.
        clock.now += 0.5
        assert (await client.get("/ready")).status_code == 200
        assert [h.calls for h in handles.values()] == [1] * len(handles)
        # After it: one fresh round trip, which sees a pool that went away.
        clock.now += 1.0
        next(iter(handles.values())).healthy = False
        answers = await asyncio.gather(*(client.get("/ready") for _ in range(50)))
        assert {a.status_code for a in answers} == {503}
        assert [h.calls for h in handles.values()] == [2] * len(handles)
