"""The settle step on real Redis: a retried script must not bill twice (issue 9, item 5)."""

from __future__ import annotations

from services.redis_store import RedisStore, keys
from services.tenancy.admission import Admission, Usage
from services.tenancy.models import Tenant, TenantLimits
from services.tenancy.usage import UsageLedger

NOW = 1_800_000_000.0


async def test_settling_the_same_reservation_twice_counts_once(state: RedisStore) -> None:
    admission = Admission(state, lease_ttl_s=60, clock=lambda: NOW)
    tenant = Tenant(id="acme", limits=TenantLimits(tpm=10_000, max_concurrent=2, daily_token_budget=100_000))
    reservation = await admission.admit(tenant, 1000)
    usage = Usage(model="phi-3.5-mini", prompt_tokens=70, completion_tokens=30)
    # redis-py resends the script when the connection drops after Redis ran it: the same
    # call, twice.
    await admission.settle(reservation, 100, usage=usage)
    await admission.settle(reservation, 100, usage=usage)
    rows = await UsageLedger(state).rows([reservation.day], tenant_id="acme")
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(1, 70, 30)]
    window = await state.redis.hgetall(keys.tokens_window("acme"))
    assert sum(int(v) for v in window.values()) == 100
    assert int(await state.redis.get(keys.daily_tokens("acme", reservation.day))) == 100
    # A second request of the same tenant still settles.
    other = await admission.admit(tenant, 500)
    await admission.settle(other, 10, usage=Usage(model="phi-3.5-mini", prompt_tokens=5, completion_tokens=5))
    rows = await UsageLedger(state).rows([reservation.day], tenant_id="acme")
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(2, 75, 35)]
    assert int(await state.redis.get(keys.daily_tokens("acme", reservation.day))) == 110
