"""The whole gateway in-process: the real core, batch APIs and FastAPI app over fake pools.

`run_inprocess_gateway` builds what a gateway replica builds (services/ingress.py):
`build_core(settings, catalog, handles, live_replicas=...)`, `build_batch_api(core,
settings)` and `create_app(core, BatchApis(files, batches), settings)`, with two
differences only: each pool is a `FakePoolHandle` over a real `PoolReplica` with a
`FakeEngine` (tests/fakes/handles.py), and no Ray runs. Redis is a real redis-server
(one database of the session's, flushed before and after). The app is served through
`httpx.ASGITransport` with its lifespan running (the tenant bootstrap, the lease keeper,
closing Redis), and a tenant with an API key is created through the admin API.

httpx's ASGITransport collects a response whole before returning it: a stream's events
all arrive, but a test cannot leave in the middle of one (cancel at the core instead).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from services.batch.api import build_batch_api
from services.catalog.loader import load_catalog
from services.catalog.models import Catalog
from services.gateway.app import create_app
from services.inference.core import Core, build_core
from services.inference.ports import BatchApis
from services.settings import Settings
from services.tenancy.models import Tenant
from tests.fakes.engine import FakeEngine
from tests.fakes.handles import FakePoolHandle, FakePools, start_fake_pools

ADMIN_KEY = "inprocess-admin-key-0123456789abcdef"
CACHE_SALT_SECRET = "inprocess-cache-salt-secret-0123456789"
BASE_URL = "http://gateway.test"
TENANT = Tenant(id="acme", name="In-process test tenant")


@dataclass
class InProcessGateway:
    """A running in-process gateway and the handles a test needs on it.

    `client` sends no credentials; pass `headers=gw.auth` (the tenant's key) or
    `headers=gw.admin`. `pools.engines[...]` / `engine(model)` steer and inspect the fake
    engines; `pools.handles[...]` make Serve calls fail (`fail_assignment`, `fail_calls`).
    """

    app: FastAPI
    client: httpx.AsyncClient
    core: Core
    batch_apis: BatchApis
    pools: FakePools
    settings: Settings
    tenant: Tenant
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def engine(self, model: str) -> FakeEngine:
        return self.pools.engine_for(model)

    def handle(self, pool: str) -> FakePoolHandle:
        return self.pools.handles[pool]

    async def add_tenant(self, tenant: Tenant) -> str:
        """Create (or replace) a tenant and a key for it through the admin API; the key."""
        created = await self.client.post(
            "/admin/tenants", json=tenant.model_dump(mode="json"), headers=self.admin
        )
        assert created.status_code == 201, created.text
        key = await self.client.post(
            f"/admin/tenants/{tenant.id}/keys", json={"name": "test"}, headers=self.admin
        )
        assert key.status_code == 201, key.text
        return str(key.json()["key"])

    async def put_tenant(self, tenant: Tenant) -> None:
        """Change a tenant's record (limits, models) through the admin API."""
        updated = await self.client.post(
            "/admin/tenants", json=tenant.model_dump(mode="json"), headers=self.admin
        )
        assert updated.status_code == 201, updated.text


def inprocess_settings(redis_url: str, directory: Path, **overrides: Any) -> Settings:
    """Settings of an in-process gateway: no gRPC, no demo tenant, tenant records never
    cached (a test's admin change applies at once), short waits for a pool that is down.
    `cache_dir` is empty, so prompt tokens are estimated (no tokenizer files needed)."""
    values: dict[str, Any] = {
        "profile": "local",
        "cache_dir": directory / "cache",
        "files_dir": directory / "files",
        "redis_url": redis_url,
        "admin_key": SecretStr(ADMIN_KEY),
        "api_key": None,
        "cache_salt_secret": SecretStr(CACHE_SALT_SECRET),
        "grpc_port": None,
        "pool_ready_timeout_s": 0.5,
        "ready_cache_ttl_s": 0.0,
        "tenant_cache_ttl_s": 0.0,
        "queue_timeout_s": 5.0,
        "lease_ttl_s": 30.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def run_inprocess_gateway(
    redis_url: str,
    directory: Path,
    *,
    catalog: Catalog | None = None,
    tenant: Tenant = TENANT,
    **settings: Any,
) -> AsyncIterator[InProcessGateway]:
    """Build and run an in-process gateway (see the module docstring); `settings` override
    `inprocess_settings`. The Redis database of `redis_url` is flushed before and after."""
    config = inprocess_settings(redis_url, directory, **settings)
    catalog = catalog or load_catalog("local")
    await _flush(redis_url)
    pools = await start_fake_pools(catalog)
    core = build_core(config, catalog, pools.handles, live_replicas=pools.live_replicas)
    files, batches = build_batch_api(core, config)
    batch_apis = BatchApis(files=files, batches=batches)
    app = create_app(core, batch_apis, config)
    try:
        # The app's own lifespan (asgi-lifespan's LifespanManager does no more than this).
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
                gateway = InProcessGateway(app, client, core, batch_apis, pools, config, tenant, api_key="")
                gateway.api_key = await gateway.add_tenant(tenant)
                yield gateway
    finally:
        await _flush(redis_url)


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of a Server-Sent Events body, decoded; "[DONE]" stays a string."""
    payloads: list[Any] = []
    for event in body.split("\n\n"):
        if event.startswith("data: "):
            data = event.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def _flush(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
