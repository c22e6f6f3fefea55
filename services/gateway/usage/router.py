"""HTTP only: GET /v1/usage, the calling tenant's own usage."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.deps import CoreServices, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.usage_report import usage_report

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/v1/usage")
async def my_usage(
    tenant: LimitedTenant, core: CoreServices, date: str | None = None, days: int = 1
) -> JSONResponse:
    # Scoped to the caller's tenant whatever the query says: no tenant_id parameter here.
    return JSONResponse(await usage_report(core.usage, date=date, days=days, tenant_id=tenant.id))
