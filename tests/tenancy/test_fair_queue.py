"""Start-time fair queueing in Redis: weights, classes, timeouts, leases."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import Overloaded
from services.redis_store import RedisStore, keys
from services.tenancy.fair_queue import FairQueue, Grant


async def _fill(fq: FairQueue, n: int) -> list[Grant]:
    return [
        await fq.acquire("p", tenant_id="filler", cost=1, weight=1, priority=1, timeout_s=1) for _ in range(n)
    ]


async def test_idle_pool_grants_in_one_call(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 2}, max_waiting=10, lease_ttl_s=30)
    grant = await fq.acquire("p", tenant_id="a", cost=100, weight=1, priority=1, timeout_s=1)
    assert grant.waited_s < 0.5
    assert await fq.depth("p") == (1, 0)
    await fq.release(grant)
    assert await fq.depth("p") == (0, 0)


async def test_weighted_shares_when_saturated(state: RedisStore) -> None:
    """Heavy floods with 30 tickets, light (weight 2) sends 10: light is served at twice
    the heavy tenant's token rate, not behind the whole flood."""
    fq = FairQueue(state, {"p": 1}, max_waiting=100, lease_ttl_s=30)
    holder = (await _fill(fq, 1))[0]
    order: list[str] = []

    async def waiter(tenant: str, weight: float) -> None:
        grant = await fq.acquire("p", tenant_id=tenant, cost=100, weight=weight, priority=1, timeout_s=30)
        order.append(tenant)
        await fq.release(grant)

    tasks = [asyncio.create_task(waiter("heavy", 1)) for _ in range(30)]
    await asyncio.sleep(0.2)  # the flood is queued first
    tasks += [asyncio.create_task(waiter("light", 2)) for _ in range(10)]
    await asyncio.sleep(0.2)
    await fq.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    first_15 = order[:15]
    # Light's 10 tickets finish within the first 15 grants (2:1 interleaving), even
    # though all 30 heavy tickets were queued before them.
    assert first_15.count("light") >= 9, order
    assert order.count("light") == 10


async def test_priority_class_goes_first(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=100, lease_ttl_s=30)
    holder = (await _fill(fq, 1))[0]
    order: list[str] = []

    async def waiter(name: str, priority: int) -> None:
        grant = await fq.acquire("p", tenant_id=name, cost=10, weight=1, priority=priority, timeout_s=10)
        order.append(name)
        await fq.release(grant)

    tasks = [asyncio.create_task(waiter(f"batch{i}", 2)) for i in range(3)]
    await asyncio.sleep(0.1)
    tasks.append(asyncio.create_task(waiter("interactive", 0)))
    await asyncio.sleep(0.1)
    await fq.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order[0] == "interactive"


async def test_timeout_is_overloaded_and_leaks_nothing(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=100, lease_ttl_s=30)
    holder = (await _fill(fq, 1))[0]
    with pytest.raises(Overloaded) as info:
        await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=0.3)
    assert info.value.retry_after_s >= 1
    assert await fq.depth("p") == (1, 0)
    await fq.release(holder)
    assert await fq.depth("p") == (0, 0)
    assert not [k async for k in state.redis.scan_iter(keys.ticket_grant("p", "*"))]


async def test_queue_bound(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=2, lease_ttl_s=30)
    await _fill(fq, 1)
    waiters = [
        asyncio.create_task(fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=2))
        for _ in range(2)
    ]
    await asyncio.sleep(0.2)
    with pytest.raises(Overloaded, match="waiting"):
        await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=2)
    for w in waiters:
        with pytest.raises(Overloaded):
            await w


async def test_crashed_holders_lease_expires(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=1)
    await _fill(fq, 1)  # never released: its gateway "died"
    with pytest.raises(Overloaded):
        await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=0.2)
    # Redis's clock, not the gateway's, expires the lease: the next step reclaims the slot.
    grant = await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=5)
    assert grant.pool == "p" and grant.waited_s > 0.3


async def test_fcfs_policy_keeps_arrival_order(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=100, lease_ttl_s=30, policy="fcfs")
    holder = (await _fill(fq, 1))[0]
    order: list[str] = []

    async def waiter(name: str, weight: float) -> None:
        grant = await fq.acquire("p", tenant_id=name, cost=100, weight=weight, priority=1, timeout_s=10)
        order.append(name)
        await fq.release(grant)

    tasks = []
    for queued, (name, weight) in enumerate([("heavy", 1)] * 5 + [("light", 100)] * 2, start=1):
        tasks.append(asyncio.create_task(waiter(name, weight)))
        # Arrival order is the order the tickets reach Redis: wait for each one to queue.
        deadline = asyncio.get_running_loop().time() + 10
        while await state.redis.zcard(keys.pool_waiting("p")) < queued:
            assert asyncio.get_running_loop().time() < deadline, f"ticket {queued} never queued"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.002)  # fcfs scores are Redis milliseconds: no two alike
    await fq.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == ["heavy"] * 5 + ["light"] * 2
