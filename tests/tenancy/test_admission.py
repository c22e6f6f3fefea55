"""Admission against real Redis: exact sliding windows, settlement, leases, budget."""

from __future__ import annotations

import pytest

from services.errors import RateLimited
from services.redis_store import RedisStore, keys
from services.tenancy.admission import Admission
from services.tenancy.models import Tenant, TenantLimits


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _tenant(**limits: int) -> Tenant:
    return Tenant(id="acme", limits=TenantLimits(**limits))


async def test_rpm_is_exact_and_slides(state: RedisStore) -> None:
    clock = FakeClock()
    admission = Admission(state, lease_ttl_s=60, clock=clock)
    tenant = _tenant(rpm=10)
    for _ in range(10):
        r = await admission.admit(tenant, 1)
        await admission.settle(r, 1)
        clock.now += 1
    with pytest.raises(RateLimited) as info:
        await admission.admit(tenant, 1)
    err = info.value
    assert err.code == "rate_limit_exceeded" and err.param == "requests_per_minute"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-limit-requests"] == "10"
    # The oldest request leaves the window 60 s after it was admitted: 50 s from now.
    assert 49 <= err.retry_after_s <= 51
    clock.now += 50
    await admission.admit(tenant, 1)


async def test_tpm_reserves_then_settles_to_actual(state: RedisStore) -> None:
    clock = FakeClock()
    admission = Admission(state, lease_ttl_s=60, clock=clock)
    tenant = _tenant(tpm=1000)
    first = await admission.admit(tenant, 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(RateLimited, match="tokens per minute"):
        await admission.admit(tenant, 600)
    await admission.settle(first, 100)  # used far less than reserved
    second = await admission.admit(tenant, 600)
    assert second.headers["x-ratelimit-remaining-tokens"] == "300"
    with pytest.raises(RateLimited, match="more than the tenant's 1000 tokens per minute"):
        await admission.admit(tenant, 1001)


async def test_concurrency_slot_freed_by_settle_or_lease_expiry(state: RedisStore) -> None:
    clock = FakeClock()
    admission = Admission(state, lease_ttl_s=30, clock=clock)
    tenant = _tenant(max_concurrent=2)
    a = await admission.admit(tenant, 1)
    await admission.admit(tenant, 1)  # this one "crashes": never settled
    with pytest.raises(RateLimited, match="in flight"):
        await admission.admit(tenant, 1)
    await admission.settle(a, 1)
    await admission.admit(tenant, 1)
    with pytest.raises(RateLimited):
        await admission.admit(tenant, 1)
    clock.now += 31  # the leaked leases expire
    await admission.admit(tenant, 1)
    assert await state.redis.zcard(keys.concurrency_leases("acme")) == 1


async def test_renewed_lease_survives(state: RedisStore) -> None:
    clock = FakeClock()
    admission = Admission(state, lease_ttl_s=30, clock=clock)
    tenant = _tenant(max_concurrent=1)
    long_stream = await admission.admit(tenant, 1)
    clock.now += 20
    await admission.renew([long_stream])
    clock.now += 20
    with pytest.raises(RateLimited):
        await admission.admit(tenant, 1)


async def test_daily_budget(state: RedisStore) -> None:
    clock = FakeClock()
    admission = Admission(state, lease_ttl_s=30, clock=clock)
    tenant = _tenant(daily_token_budget=1000)
    r = await admission.admit(tenant, 900)
    await admission.settle(r, 800)
    with pytest.raises(RateLimited, match="Daily token budget") as info:
        await admission.admit(tenant, 300)
    assert info.value.retry_after_s > 0
    await admission.admit(tenant, 200)


async def test_redis_down_fails_closed_or_open(redis_server) -> None:  # type: ignore[no-untyped-def]
    dead = RedisStore("redis://127.0.0.1:1/0")
    from services.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable):
        await Admission(dead, lease_ttl_s=30).admit(_tenant(rpm=1), 1)
    reservation = await Admission(dead, lease_ttl_s=30, fail_open=True).admit(_tenant(rpm=1), 1)
    assert reservation.recorded is False
    await dead.close()
