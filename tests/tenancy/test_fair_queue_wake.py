"""The grant push after a dispatch (fair_queue.lua cannot name the grant lists of the
tickets its dispatch picks, so the caller pushes them after the step): a push that never
happens (the releasing gateway died right after its step) delays the waiter by at most one
renew slice, never leaves it waiting out its timeout."""

from __future__ import annotations

import asyncio
import time

from services.redis_store import RedisStore, Script, keys
from services.tenancy.fair_queue import FairQueue

TICKET_TTL_S = 1.5  # the waiter renews (and so looks for its grant) every 0.5 s


async def test_a_waiter_whose_grant_push_was_lost_claims_it_at_its_next_renew(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=30, ticket_ttl_s=TICKET_TTL_S)
    holder = await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=1)
    waiter = asyncio.create_task(fq.acquire("p", tenant_id="b", cost=1, weight=1, priority=1, timeout_s=10))
    deadline = time.monotonic() + 5
    while await state.redis.zcard(keys.pool_waiting("p")) != 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        await asyncio.sleep(0.01)
    # The release step alone, as a gateway that died before pushing the grant would leave it.
    pool_keys = [
        keys.pool_in_flight("p"),
        keys.pool_waiting("p"),
        keys.pool_tickets("p"),
        keys.pool_virtual_time("p"),
        keys.pool_ticket_leases("p"),
        keys.pool_tenant_waiting("p"),
        keys.ticket_grant("p", holder.ticket_id),
    ]
    released_at = time.monotonic()
    result, granted = await state.script(
        Script.FAIR_QUEUE,
        keys=pool_keys,
        args=["release", 1, 30_000, int(TICKET_TTL_S * 1000), holder.ticket_id],
    )
    assert result == 0 and len(granted) == 1  # the waiter's ticket, granted but not told
    assert not [k async for k in state.redis.scan_iter(keys.ticket_grant("p", "*"))]
    grant = await asyncio.wait_for(waiter, 5)
    assert grant.ticket_id == granted[0]
    assert time.monotonic() - released_at < TICKET_TTL_S / 3 + 0.5
    await fq.release(grant)
    assert await fq.depth("p") == (0, 0)


async def test_a_pushed_grant_wakes_the_waiter_at_once(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=30, ticket_ttl_s=30)  # renews every 10 s
    holder = await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=1)
    waiter = asyncio.create_task(fq.acquire("p", tenant_id="b", cost=1, weight=1, priority=1, timeout_s=10))
    deadline = time.monotonic() + 5
    while await state.redis.zcard(keys.pool_waiting("p")) != 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        await asyncio.sleep(0.01)
    released_at = time.monotonic()
    await fq.release(holder)
    grant = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - released_at < 1.0  # woken by the push, not by a 10 s renew
    await fq.release(grant)
    assert not [k async for k in state.redis.scan_iter(keys.ticket_grant("p", "*"))]
