"""Cache-aware accounting on real Redis (issue 13, item 3): the daily budget charges cached
prompt tokens at the billing factor, the fair queue's virtual time is corrected at release
to the actual cost, and usage records cached and uncached prompt tokens."""

from __future__ import annotations

import asyncio

import pytest

from services.redis_store import RedisStore, keys
from services.tenancy.admission import Admission, Usage
from services.tenancy.entry import TenancySteps
from services.tenancy.fair_queue import FairQueue
from services.tenancy.models import Tenant, TenantLimits
from services.tenancy.usage import UsageLedger

NOW = 1_800_000_000.0
MODEL = "phi-3.5-mini"
TENANT = Tenant(id="acme", limits=TenantLimits(tpm=100_000, max_concurrent=4, daily_token_budget=100_000))


async def _spent(state: RedisStore, tenant_id: str, day: str) -> int:
    return int(await state.redis.get(keys.daily_tokens(tenant_id, day)) or 0)


async def _window(state: RedisStore, tenant_id: str) -> int:
    return sum(int(v) for v in (await state.redis.hgetall(keys.tokens_window(tenant_id))).values())


async def _last_finish(state: RedisStore, pool: str, tenant_id: str) -> float:
    return float(await state.redis.hget(keys.pool_virtual_time(pool), f"t:{tenant_id}") or 0)


def test_the_budget_charge_rounds_in_the_tenants_disfavour() -> None:
    # 33 cached tokens at half price: 17 charged (16.5 rounded up), a credit of 16.
    usage = Usage(
        MODEL, prompt_tokens=40, completion_tokens=5, cached_prompt_tokens=33, cached_billing_factor=0.5
    )
    assert (usage.cache_credit_tokens, usage.billed_tokens) == (16, 29)
    full = Usage(MODEL, prompt_tokens=40, completion_tokens=5, cached_prompt_tokens=33)
    assert full.billed_tokens == 45  # the default factor 1: cached tokens cost in full
    free = Usage(
        MODEL, prompt_tokens=40, completion_tokens=5, cached_prompt_tokens=33, cached_billing_factor=0
    )
    assert free.billed_tokens == 12


@pytest.mark.parametrize(("cached", "factor"), [(41, 0.5), (-1, 0.5), (10, 1.5), (10, -0.1)])
def test_usage_refuses_a_cached_count_beyond_the_prompt_or_a_factor_beyond_one(
    cached: int, factor: float
) -> None:
    with pytest.raises(ValueError):
        Usage(
            MODEL,
            prompt_tokens=40,
            completion_tokens=5,
            cached_prompt_tokens=cached,
            cached_billing_factor=factor,
        )


async def test_budget_charges_cached_tokens_at_the_factor_and_the_window_in_full(state: RedisStore) -> None:
    admission = Admission(state, lease_ttl_s=60, clock=lambda: NOW)
    first = await admission.admit(TENANT, 1000)
    await admission.settle(first, 600, usage=Usage(MODEL, 500, 100))
    assert await _spent(state, "acme", first.day) == 600
    # The same prompt again: 384 of its 500 tokens from the prefix cache, billed at 0.5.
    second = await admission.admit(TENANT, 1000)
    cached = Usage(MODEL, 500, 100, cached_prompt_tokens=384, cached_billing_factor=0.5)
    # Settled twice (redis-py resends a script whose reply it lost): counted once.
    await admission.settle(second, 600, usage=cached)
    await admission.settle(second, 600, usage=cached)
    assert await _spent(state, "acme", first.day) == 600 + (600 - 192)
    # The TPM window is a rate limit on tokens processed: every token counts there.
    assert await _window(state, "acme") == 1200
    (row,) = await UsageLedger(state).rows([first.day], tenant_id="acme")
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 1000, 200)
    assert (row.cached_prompt_tokens, row.uncached_prompt_tokens, row.billed_tokens) == (384, 616, 1008)
    # The budget key and the usage report agree on what was charged.
    assert row.billed_tokens == await _spent(state, "acme", first.day)


async def test_usage_settled_before_the_cache_fields_existed_reads_as_charged_in_full(
    state: RedisStore,
) -> None:
    day = "20270115"
    await state.redis.hset(
        keys.tenant_usage("old", day),
        mapping={f"{MODEL}|requests": 2, f"{MODEL}|prompt_tokens": 70, f"{MODEL}|completion_tokens": 30},
    )
    await state.redis.sadd(keys.usage_tenants(day), "old")
    (row,) = await UsageLedger(state).rows([day])
    assert (row.cached_prompt_tokens, row.uncached_prompt_tokens, row.billed_tokens) == (0, 70, 100)


async def test_release_corrects_the_tenants_virtual_finish_once(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 2}, max_waiting=10, lease_ttl_s=30)
    grant = await fq.acquire("p", tenant_id="a", cost=100, weight=2, priority=1, timeout_s=1)
    assert await _last_finish(state, "p", "a") == 50  # 100 / weight 2, from virtual time 0
    await fq.release(grant, actual_cost=30)
    assert await _last_finish(state, "p", "a") == 15
    # A resent release finds no slot to free: no second correction.
    await fq.release(grant, actual_cost=30)
    assert await _last_finish(state, "p", "a") == 15
    # Without an actual cost the acquire's charge stands (as before issue 13).
    other = await fq.acquire("p", tenant_id="b", cost=100, weight=1, priority=1, timeout_s=1)
    await fq.release(other)
    assert await _last_finish(state, "p", "b") == 100


async def test_a_ticket_that_expired_before_its_release_is_not_refunded(state: RedisStore) -> None:
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=0.2)
    grant = await fq.acquire("p", tenant_id="a", cost=100, weight=1, priority=1, timeout_s=1)
    expiry = await state.redis.zscore(keys.pool_in_flight("p"), grant.ticket_id)
    assert expiry is not None
    expiry_ms = float(expiry)
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # until Redis's own clock (the script's) is past the lease
        seconds, micros = await state.redis.time()
        if seconds * 1000 + micros // 1000 > expiry_ms:
            break
        assert asyncio.get_running_loop().time() < deadline, "the lease never expired"
        await asyncio.sleep(0.05)
    await fq.release(grant, actual_cost=0)  # its step drops the expired lease first
    assert await _last_finish(state, "p", "a") == 100
    assert await fq.depth("p") == (0, 0)


async def test_a_tenant_whose_prompts_hit_its_cache_goes_ahead_in_the_queue(state: RedisStore) -> None:
    """A reserved more than B (200 vs 100 tokens) but its prompt came from the cache:
    corrected to its real cost (20), A's next ticket starts before B's even though B
    queued first. Uncorrected, A's would start at 200, after B's 100."""
    fq = FairQueue(state, {"p": 2}, max_waiting=10, lease_ttl_s=30)
    a = await fq.acquire("p", tenant_id="a", cost=200, weight=1, priority=1, timeout_s=1)
    b = await fq.acquire("p", tenant_id="b", cost=100, weight=1, priority=1, timeout_s=1)
    await fq.release(a, actual_cost=20)
    await fq.release(b, actual_cost=100)
    holders = [
        await fq.acquire("p", tenant_id="filler", cost=1, weight=1, priority=1, timeout_s=1) for _ in "12"
    ]
    order: list[str] = []

    async def wait(tenant: str) -> None:
        grant = await fq.acquire("p", tenant_id=tenant, cost=100, weight=1, priority=1, timeout_s=10)
        order.append(tenant)
        await fq.release(grant, actual_cost=100)

    b_waits = asyncio.create_task(wait("b"))
    while (await fq.depth("p"))[1] < 1:
        await asyncio.sleep(0.01)
    a_waits = asyncio.create_task(wait("a"))
    while (await fq.depth("p"))[1] < 2:
        await asyncio.sleep(0.01)
    await fq.release(holders[0])  # one slot: the lower start tag gets it
    await asyncio.wait_for(asyncio.gather(a_waits, b_waits, fq.release(holders[1])), 10)
    assert order == ["a", "b"]


async def test_leave_settles_and_corrects_in_one_step(state: RedisStore) -> None:
    """leave.lua: the budget at the billing factor, the virtual finish at the queue cost."""
    admission = Admission(state, lease_ttl_s=30)
    fq = FairQueue(state, {"q": 2}, max_waiting=10, lease_ttl_s=30)
    steps = TenancySteps(state, admission, fq)
    tenant = Tenant(id="acme", weight=2, limits=TenantLimits(daily_token_budget=100_000))
    reservation, grant = await steps.enter(tenant, 1000, pool="q", cost=1500.0, timeout_s=5)
    assert await _last_finish(state, "q", "acme") == 750
    usage = Usage(MODEL, 500, 100, cached_prompt_tokens=256, cached_billing_factor=0.25)
    await steps.leave(reservation, grant, 600, usage=usage, queue_cost=400.0)
    assert await _spent(state, "acme", reservation.day) == 600 - 192
    assert await _last_finish(state, "q", "acme") == 200
    assert await fq.depth("q") == (0, 0)
    (row,) = await UsageLedger(state).rows([reservation.day], tenant_id="acme")
    assert (row.cached_prompt_tokens, row.billed_tokens) == (256, 408)
