"""Usage is indexed by tenant (issue 9, item 9): a tenant's query reads its own keys only.

Checked with Redis MONITOR on the real server: every key B's query touches is one of B's.
"""

from __future__ import annotations

import pytest

from services.errors import InvalidRequest
from services.inference.usage_report import usage_report
from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore
from services.tenancy.admission import Admission, Usage
from services.tenancy.models import Tenant
from services.tenancy.usage import UsageLedger
from tests.conftest import UNIT_DB
from tests.redis_store.monitor import commands_during

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


async def _use(admission: Admission, tenant_id: str, model: str, prompt: int, completion: int) -> str:
    reservation = await admission.admit(Tenant(id=tenant_id), prompt + completion)
    await admission.settle(reservation, prompt + completion, usage=Usage(model, prompt, completion))
    return reservation.day


async def _keys_read_during(redis_server: LocalRedis, state: RedisStore, query) -> list[str]:  # type: ignore[no-untyped-def]
    """The keys of every command Redis ran while `query` ran (MONITOR)."""
    url = f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}"
    commands = [command.split() for command in await commands_during(url, state.redis, query)]
    return [parts[1] if len(parts) > 1 else "" for parts in commands if parts]


async def test_a_tenant_reads_only_its_own_usage_keys(redis_server: LocalRedis, state: RedisStore) -> None:
    admission = Admission(state, lease_ttl_s=60, clock=lambda: NOW)
    day = await _use(admission, "alpha", "phi-3.5-mini", 11, 7)
    await _use(admission, "alpha", "phi-3.5-moe", 3, 2)
    await _use(admission, "bravo", "phi-3.5-mini", 5, 1)
    ledger = UsageLedger(state)

    rows: list = []  # type: ignore[type-arg]

    async def bravo_query() -> None:
        rows.extend(await ledger.rows([day, "20270114", "20270113"], tenant_id="bravo"))

    touched = await _keys_read_during(redis_server, state, bravo_query)
    assert [(r.tenant_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("bravo", "phi-3.5-mini", 1, 5, 1)
    ]
    assert touched, "the query ran no Redis command"
    assert all("bravo" in key and "alpha" not in key for key in touched), touched

    # The admin view of every tenant still works.
    everyone = await ledger.rows([day])
    assert sorted((r.tenant_id, r.model, r.requests) for r in everyone) == [
        ("alpha", "phi-3.5-mini", 1),
        ("alpha", "phi-3.5-moe", 1),
        ("bravo", "phi-3.5-mini", 1),
    ]
    assert [r.tenant_id for r in await ledger.rows([day], tenant_id="alpha")] == ["alpha", "alpha"]


@pytest.mark.parametrize(
    ("date", "days", "param"),
    [
        ("0001-01-01", 2, "date"),
        ("0001-01-01", 92, "date"),
        ("2026-02-30", 1, "date"),
        ("x", 1, "date"),
        (None, 0, "days"),
        (None, 93, "days"),
    ],
)
async def test_usage_dates_out_of_range_are_400(
    state: RedisStore, date: str | None, days: int, param: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await usage_report(UsageLedger(state), date=date, days=days, tenant_id="alpha")
    assert info.value.param == param


async def test_first_day_of_the_calendar_alone_is_fine(state: RedisStore) -> None:
    report = await usage_report(UsageLedger(state), date="0001-01-01", days=1, tenant_id="alpha")
    assert report == {"object": "list", "data": []}
