"""`fail_open_limits` means what it says (issue 9, item 9), on a real Redis that refuses writes.

A Redis at `maxmemory` (the chart's policy refuses writes rather than evicting) still serves
reads: keys can be checked, but no limit, lease or queue ticket can be written. With
`fail_open_limits` the gateway then admits authenticated requests without limits and
without the fair queue; it used to refuse them anyway, at the fair queue. Without the
setting they get 503. Authentication never fails open: with Redis gone, no key is accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from services.catalog.loader import load_catalog
from services.errors import ServiceUnavailable
from services.inference.core import Core, build_core
from services.local.redis_server import LocalRedis
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.settings import Settings
from services.tenancy.models import Tenant
from tests.conftest import CACHE_DIR, free_port

TENANT = Tenant(id="steady")


@pytest.fixture
async def full_redis(tmp_path: Path) -> AsyncIterator[LocalRedis]:
    server = LocalRedis(port=free_port(), directory=tmp_path)
    server.start(appendonly=False)
    try:
        yield server
    finally:
        server.stop()


def _core(url: str, *, fail_open: bool) -> Core:
    settings = Settings(
        redis_url=url,
        cache_dir=CACHE_DIR,
        admin_key=SecretStr("fail-open-admin-key-0123456789"),
        fail_open_limits=fail_open,
    )
    return build_core(settings, load_catalog("local"), {})


def _request() -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=8),
        messages=(ChatMessage(role="user", text="hello"),),
    )


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_refusing_writes(full_redis: LocalRedis, fail_open: bool) -> None:
    core = _core(full_redis.url, fail_open=fail_open)
    try:
        await core.tenants.put_tenant(TENANT)
        plain, _ = await core.tenants.create_key(TENANT.id)
        admin = aioredis.Redis.from_url(full_redis.url)
        await admin.config_set("maxmemory", 1)  # from now on every write is refused (OOM)
        await admin.aclose()

        tenant, _ = await core.tenants.authenticate(plain)  # reads still work
        pool = core.catalog.enabled_pools[0]
        gate = core.runner._gate
        if not fail_open:
            with pytest.raises(ServiceUnavailable):
                await gate.enter(tenant, pool, _request(), deadline_s=None)
            return
        admitted = await gate.enter(tenant, pool, _request(), deadline_s=None)
        assert admitted.reservation.recorded is False  # no limits recorded
        # (The fair queue's own step still runs here: Redis lets a script that already
        # deleted something finish its writes, and the queue's memory is bounded by its caps.)
        await gate.leave(admitted, prompt_tokens=3, completion_tokens=2)  # nothing to settle, no error
    finally:
        await core.redis.close()


async def test_redis_lost_after_authentication(full_redis: LocalRedis) -> None:
    """Redis goes away between the key check and admission: with fail_open_limits the
    request is admitted without limits and without queueing (it used to be refused at the
    fair queue, so the setting had no effect)."""
    core = _core(full_redis.url, fail_open=True)
    try:
        await core.tenants.put_tenant(TENANT)
        plain, _ = await core.tenants.create_key(TENANT.id)
        tenant, _ = await core.tenants.authenticate(plain)
        full_redis.stop()
        gate = core.runner._gate
        admitted = await gate.enter(tenant, core.catalog.enabled_pools[0], _request(), deadline_s=None)
        assert admitted.reservation.recorded is False
        assert admitted.grant is not None and admitted.grant.recorded is False
        await gate.leave(admitted, prompt_tokens=3, completion_tokens=2)
    finally:
        await core.redis.close()


async def test_authentication_never_fails_open(full_redis: LocalRedis) -> None:
    core = _core(full_redis.url, fail_open=True)
    try:
        await core.tenants.put_tenant(TENANT)
        plain, _ = await core.tenants.create_key(TENANT.id)
        full_redis.stop()
        with pytest.raises(ServiceUnavailable):
            await core.tenants.authenticate(plain)
    finally:
        await core.redis.close()
