"""Usage reports: a tenant's own (GET /v1/usage) or everyone's (GET /admin/usage)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from datetime import date as Date
from typing import cast

from services.errors import InvalidRequest
from services.inference.protocol.responses import UsageReport, UsageRow
from services.tenancy.usage import UsageLedger

MAX_DAYS = 92


def _days(date: str | None, days: int) -> list[str]:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidRequest(f"days must be between 1 and {MAX_DAYS}", param="days")
    try:
        end = Date.fromisoformat(date) if date else datetime.now(UTC).date()
    except ValueError:
        raise InvalidRequest("date must look like 2026-11-27", param="date") from None
    if (end - Date.min).days < days - 1:
        # The calendar starts at 0001-01-01: counting back past it overflowed (a 500).
        raise InvalidRequest(f"date minus {days - 1} days falls before 0001-01-01", param="date")
    return [(end - timedelta(days=i)).strftime("%Y%m%d") for i in range(days)]


async def usage_report(
    ledger: UsageLedger, *, date: str | None, days: int, tenant_id: str | None
) -> UsageReport:
    rows = await ledger.rows(_days(date, days), tenant_id=tenant_id)
    return {"object": "list", "data": [cast(UsageRow, dataclasses.asdict(row)) for row in rows]}
