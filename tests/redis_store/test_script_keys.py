"""Every Lua script receives every key it touches through KEYS (issue 10, item 3).

Each script runs on the session's real redis-server, called by its real caller (admission,
fair queue, batch queue, quotas) in the cases that reach each of its key-touching branches;
MONITOR shows every command the script ran, and Redis's COMMAND GETKEYS names their keys.
A key built inside a script (as record_result.lua once built `<prefix>:batch:<id>` from
ARGV, and fair_queue.lua a waiter's grant list) is not among its KEYS and fails here.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.batch.queue import BatchQueue, add_items
from services.batch.quotas import Quota, TenantQuotas
from services.errors import Overloaded
from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore, Script, keys
from services.redis_store.scripts import LUA_DIR
from services.tenancy.adapters import AdapterRegistry, new_record
from services.tenancy.admission import Admission, Usage
from services.tenancy.entry import TenancySteps
from services.tenancy.fair_queue import FairQueue
from services.tenancy.models import AuthStamp, Tenant, TenantLimits
from tests.conftest import UNIT_DB
from tests.redis_store.monitor import ScriptCall, ScriptMonitor


def _url(redis_server: LocalRedis) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}"


async def _until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _admission(state: RedisStore) -> None:
    admission = Admission(state, lease_ttl_s=30)
    tenant = Tenant(
        id="acme", limits=TenantLimits(rpm=10, tpm=1000, max_concurrent=2, daily_token_budget=10_000)
    )
    reservation = await admission.admit(tenant, 100)
    await admission.renew([reservation])
    await admission.settle(
        reservation, 80, usage=Usage(model="m", prompt_tokens=50, completion_tokens=30, images=1)
    )


async def _fair_queue(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=30, ticket_ttl_s=3)
    holder = await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=5)
    waiter = asyncio.create_task(fq.acquire("p", tenant_id="b", cost=1, weight=1, priority=1, timeout_s=5))

    async def queued() -> bool:
        return int(await state.redis.zcard(keys.pool_waiting("p"))) == 1

    await _until(queued)
    await fq.release(holder)  # dispatch grants the waiter's ticket
    grant = await asyncio.wait_for(waiter, 5)
    await fq.renew([grant])
    await fq.release(grant)


async def _tenancy_steps(state: RedisStore) -> None:
    """enter.lua and leave.lua: admitted and granted, queued, the full waiting room's undo."""
    admission = Admission(state, lease_ttl_s=30)
    fq = FairQueue(state, {"q": 1}, max_waiting=1, lease_ttl_s=30, ticket_ttl_s=3)
    steps = TenancySteps(state, admission, fq)
    tenant = Tenant(id="acme", limits=TenantLimits(rpm=10, tpm=1000, max_concurrent=3)).stamped(
        AuthStamp("digest", str(await state.redis.get(keys.AUTH_VERSION) or "0"))
    )
    held = await steps.enter(tenant, 10, pool="q", cost=10, timeout_s=5)
    waiter = asyncio.create_task(steps.enter(tenant, 10, pool="q", cost=10, timeout_s=5))

    async def queued() -> bool:
        return int(await state.redis.zcard(keys.pool_waiting("q"))) == 1

    await _until(queued)
    with pytest.raises(Overloaded):  # the waiting room (1) is full: enter.lua undoes the admission
        await steps.enter(tenant, 10, pool="q", cost=10, timeout_s=5)
    await steps.leave(*held, 5, usage=Usage(model="m", prompt_tokens=2, completion_tokens=3))
    await steps.leave(*await asyncio.wait_for(waiter, 5), 5, usage=None)


async def _batch_queue(state: RedisStore) -> None:
    queue = BatchQueue(state, ["p"], visibility_timeout_s=60)
    await queue.ensure_groups()
    for batch_id, status in (("b1", "in_progress"), ("b2", "in_progress"), ("b3", "completed")):
        await state.redis.hset(
            keys.batch_record(batch_id), mapping={"status": status, "total": 2, "completed": 0, "failed": 0}
        )
        items = [
            {"line": line, "custom_id": f"c{line}", "url": "/v1/completions", "body": {}} for line in (1, 2)
        ]
        await add_items(state, "p", batch_id, items)  # enqueue_items.lua, as BatchService adds them
    items = await queue.read("w", count=10, block_ms=100)
    assert len(items) == 6
    # Several batches, both outcomes and a finished batch in one call.
    await queue.record_many([(item, {"n": item.line}, item.line == 1) for item in items])


async def _quotas(state: RedisStore) -> None:
    quotas = TenantQuotas(state)
    quota = Quota(max_members=2, max_sum=100, members="files", amounts="bytes")
    await quotas.reserve(keys.tenant_file_bytes("t"), "f1", 10, quota)
    await quotas.reserve(keys.tenant_file_bytes("t"), "f1", 10, quota)  # already there


async def _adapters(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    record = new_record("t", "a1", base_model="m", path="/x", rank=8, target_modules=["o_proj"])
    await registry.register(record, max_adapters=2)


async def _every_call(state: RedisStore, redis_server: LocalRedis) -> list[ScriptCall]:
    monitor = ScriptMonitor(_url(redis_server))
    async with monitor.watching():
        for scenario in (_admission, _fair_queue, _tenancy_steps, _batch_queue, _quotas, _adapters):
            await scenario(state)
    return monitor.calls


async def test_every_script_touches_only_the_keys_it_declares(
    state: RedisStore, redis_server: LocalRedis
) -> None:
    calls = await _every_call(state, redis_server)
    names = {state.script_sha(script): script for script in Script}
    ran = [(names[call.sha], call) for call in calls if call.commands]
    # Every script ran, and did touch keys (the check below is not vacuous).
    assert {script for script, _ in ran} == set(Script)
    for script in Script:
        assert any(call.touched for s, call in ran if s is script), script
    undeclared = {script.value: sorted(call.undeclared) for script, call in ran if call.undeclared}
    assert undeclared == {}


async def test_a_script_building_a_key_from_argv_is_caught(
    state: RedisStore, redis_server: LocalRedis
) -> None:
    """The check itself can fail: a script that names a key of its own, the way
    record_result.lua did (`ARGV[2] .. ':batch:' .. id`)."""
    built = state.redis.register_script(
        "redis.call('HGET', KEYS[1], 'status'); return redis.call('HGET', ARGV[1] .. ':batch:' .. ARGV[2], 'total')"
    )
    monitor = ScriptMonitor(_url(redis_server))
    async with monitor.watching():
        await built(keys=[keys.batch_record("b1")], args=[keys.PREFIX, "b1:results"])
    (call,) = [c for c in monitor.calls if c.commands]
    assert call.touched == {keys.batch_record("b1"), "phiserve:batch:b1:results"}
    assert call.undeclared == {"phiserve:batch:b1:results"}


def test_every_lua_file_is_a_registered_script() -> None:
    assert {path.stem for path in LUA_DIR.glob("*.lua")} == {script.value for script in Script}
