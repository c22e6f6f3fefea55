"""HTTP only: the Batch API, scoped to the caller's tenant."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.deps import Batches, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.batches import BatchList, BatchObject, CreateBatchRequest

router = APIRouter(prefix="/v1/batches", responses=ERROR_RESPONSES)


@router.post("")
async def create_batch(body: CreateBatchRequest, tenant: LimitedTenant, batches: Batches) -> BatchObject:
    return await batches.create(tenant.id, body)


@router.get("")
async def list_batches(
    tenant: LimitedTenant, batches: Batches, after: str | None = None, limit: int = 20
) -> BatchList:
    page, has_more = await batches.list(tenant.id, after=after, limit=limit)
    return BatchList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.get("/{batch_id}")
async def get_batch(batch_id: str, tenant: LimitedTenant, batches: Batches) -> BatchObject:
    return await batches.get(tenant.id, batch_id)


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, tenant: LimitedTenant, batches: Batches) -> BatchObject:
    return await batches.cancel(tenant.id, batch_id)
