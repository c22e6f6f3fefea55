"""HTTP only: /admin routes (the admin key only; tenant keys get 403)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.admin.protocol import CreatedKey, CreateKeyRequest, KeyList, TenantList
from services.gateway.deps import AdminOnly, Services
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.usage.service import usage_report
from services.tenancy.models import ApiKeyRecord, Tenant

router = APIRouter(prefix="/admin", dependencies=[AdminOnly], responses=ERROR_RESPONSES)


@router.get("/tenants")
async def list_tenants(services: Services) -> TenantList:
    return TenantList(data=await services.tenants.list_tenants())


@router.post("/tenants", status_code=201)
async def put_tenant(tenant: Tenant, services: Services) -> Tenant:
    return await services.tenants.put_tenant(tenant)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, services: Services) -> Tenant:
    return await services.tenants.get_tenant(tenant_id)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, services: Services) -> KeyList:
    return KeyList(data=await services.tenants.list_keys(tenant_id))


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, body: CreateKeyRequest, services: Services) -> CreatedKey:
    plain, record = await services.tenants.create_key(tenant_id, name=body.name)
    return CreatedKey(key=plain, record=record)


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, services: Services) -> ApiKeyRecord:
    return await services.tenants.revoke_key(tenant_id, key_id)


@router.get("/usage")
async def all_usage(services: Services, date: str | None = None, days: int = 1, tenant_id: str | None = None) -> JSONResponse:
    return JSONResponse(await usage_report(services.usage, date=date, days=days, tenant_id=tenant_id))
