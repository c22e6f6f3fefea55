"""A replica's key cache (issue 12) never outlives a revocation or a tenant change.

A gateway replica keeps the keys it authenticated, stamped with the auth version they were
read at; a generation's admission (enter.lua) checks that stamp in the same atomic step,
and every other route checks it with one GET. Here the attacker holds a key that a replica
has cached, and the operator revokes it, disables its tenant or narrows its models through
another replica (its own TenantStore on the same Redis, as the admin API of a second
gateway replica would). The next request through the first replica is refused, and nothing
of it is admitted or billed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore, Script, keys
from services.tenancy.store import TenantStore
from tests.conftest import inprocess_redis_url
from tests.fakes.gateway import InProcessGateway, run_inprocess_gateway

CHAT = "/v1/chat/completions"
CONNECTION_SETUP = {"HELLO", "SELECT", "CLIENT", "AUTH"}  # a new pooled connection's, not a request's
BODY = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def gw(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    # Keys cached for five minutes: only the auth version can make this replica read again.
    async with run_inprocess_gateway(
        inprocess_redis_url(redis_server), tmp_path, tenant_cache_ttl_s=300
    ) as gateway:
        yield gateway


@pytest.fixture
async def other_replica(gw: InProcessGateway) -> AsyncIterator[TenantStore]:
    store = RedisStore(gw.settings.redis_url)
    try:
        yield TenantStore(store)
    finally:
        await store.close()


async def _requests_billed(gw: InProcessGateway) -> int:
    rows = (await gw.client.get("/v1/usage", headers=gw.auth)).json()["data"]
    return sum(row["requests"] for row in rows)


async def _cached(gw: InProcessGateway) -> None:
    """One chat, so the replica has the key in its cache, and a check that it does."""
    assert (await gw.client.post(CHAT, json=BODY, headers=gw.auth)).status_code == 200
    tenant, _ = await gw.core.tenants.authenticate(gw.api_key, checked_at_admission=True)
    assert tenant.auth_stamp is not None


async def test_a_key_revoked_on_another_replica_is_refused_at_once(
    gw: InProcessGateway, other_replica: TenantStore
) -> None:
    await _cached(gw)
    (record,) = await other_replica.list_keys(gw.tenant.id)
    await other_replica.revoke_key(gw.tenant.id, record.id)

    refused = await gw.client.post(CHAT, json=BODY, headers=gw.auth)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["type"] == "authentication_error"
    streamed = await gw.client.post(CHAT, json={**BODY, "stream": True}, headers=gw.auth)
    assert streamed.status_code == 401
    assert (await gw.client.get("/v1/files", headers=gw.auth)).status_code == 401
    # Nothing of the refused requests was admitted: one request reached the engine, no
    # concurrency lease is held, no fair-queue slot is taken.
    assert len(gw.engine("phi-3.5-mini").requests) == 1
    assert await gw.core.redis.redis.zcard(keys.concurrency_leases(gw.tenant.id)) == 0
    assert await gw.core.redis.redis.zcard(keys.pool_in_flight("text")) == 0


async def test_a_tenant_disabled_on_another_replica_is_refused_at_once(
    gw: InProcessGateway, other_replica: TenantStore
) -> None:
    await _cached(gw)
    await other_replica.put_tenant(gw.tenant.model_copy(update={"disabled": True}))

    refused = await gw.client.post(CHAT, json=BODY, headers=gw.auth)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "tenant_disabled"
    assert len(gw.engine("phi-3.5-mini").requests) == 1


async def test_narrowed_models_apply_to_the_next_request(
    gw: InProcessGateway, other_replica: TenantStore
) -> None:
    await _cached(gw)
    await other_replica.put_tenant(gw.tenant.model_copy(update={"allowed_models": ["phi-3.5-moe"]}))

    refused = await gw.client.post(CHAT, json=BODY, headers=gw.auth)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert await _requests_billed(gw) == 1


async def test_a_cached_keys_generation_is_two_redis_steps(gw: InProcessGateway) -> None:
    """The common admitted path: enter.lua in, leave.lua out, nothing else (issue 12)."""
    await _cached(gw)
    client = aioredis.Redis.from_url(gw.settings.redis_url)
    sent: list[list[str]] = []  # the gateway's own commands (not those its scripts ran)
    try:
        async with client.monitor() as monitor:
            assert (await gw.client.post(CHAT, json=BODY, headers=gw.auth)).status_code == 200
            await client.echo("end-of-request")
            while True:
                seen = await monitor.next_command()
                command = seen["command"].split()
                if command[:2] == ["ECHO", "end-of-request"]:
                    break
                if seen["client_type"] != "lua" and command[0] not in CONNECTION_SETUP:
                    sent.append(command)
    finally:
        await client.aclose()
    shas = {gw.core.redis.script_sha(script): script for script in Script}
    assert [shas.get(c[1]) if c[0] == "EVALSHA" else c[0] for c in sent] == [Script.ENTER, Script.LEAVE], sent
