"""HTTP only: GET /v1/usage, the calling tenant's own usage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from services.gateway.deps import CoreServices, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.responses import UsageReport
from services.inference.usage_report import MAX_DAYS, usage_report

router = APIRouter(responses=ERROR_RESPONSES)

# The bounds `usage_report` checks (with its own messages), in the document.
ReportDate = Annotated[
    str | None,
    Query(
        description="The report's last day (UTC); today if unset or empty.",
        json_schema_extra={"anyOf": [{"format": "date"}, {"maxLength": 0}]},
    ),
]
ReportDays = Annotated[
    int,
    Query(
        description="How many days, back from `date`.", json_schema_extra={"minimum": 1, "maximum": MAX_DAYS}
    ),
]


@router.get("/v1/usage", response_model=UsageReport)
async def my_usage(
    tenant: LimitedTenant, core: CoreServices, date: ReportDate = None, days: ReportDays = 1
) -> JSONResponse:
    # Scoped to the caller's tenant whatever the query says: no tenant_id parameter here.
    return JSONResponse(await usage_report(core.usage, date=date, days=days, tenant_id=tenant.id))
