"""HTTP only: /admin routes (the admin key only; tenant keys get 403)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.admin.protocol import AdapterList, CreatedKey, CreateKeyRequest, KeyList, TenantList
from services.gateway.deps import AdminOnly, CoreServices
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.usage.router import ReportDate, ReportDays
from services.inference.protocol.responses import UsageReport
from services.inference.usage_report import usage_report
from services.tenancy.adapters import AdapterRecord, AdapterRegistration
from services.tenancy.models import ApiKeyRecord, Tenant

router = APIRouter(prefix="/admin", dependencies=[AdminOnly], responses=ERROR_RESPONSES)


@router.get("/tenants")
async def list_tenants(core: CoreServices) -> TenantList:
    return TenantList(data=await core.tenants.list_tenants())


@router.post("/tenants", status_code=201)
async def put_tenant(tenant: Tenant, core: CoreServices) -> Tenant:
    return await core.tenants.put_tenant(tenant)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, core: CoreServices) -> Tenant:
    return await core.tenants.get_tenant(tenant_id)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, core: CoreServices) -> KeyList:
    return KeyList(data=await core.tenants.list_keys(tenant_id))


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, body: CreateKeyRequest, core: CoreServices) -> CreatedKey:
    plain, record = await core.tenants.create_key(tenant_id, name=body.name)
    return CreatedKey(key=plain, record=record)


@router.delete("/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, core: CoreServices) -> ApiKeyRecord:
    return await core.tenants.revoke_key(tenant_id, key_id)


@router.post("/tenants/{tenant_id}/adapters", status_code=201)
async def register_adapter(tenant_id: str, body: AdapterRegistration, core: CoreServices) -> AdapterRecord:
    """Registers a LoRA adapter for the tenant (docs/adapters.md): its files are validated
    against the base model first; the tenant calls it as the record's `id`."""
    return await core.adapter_admin.register(tenant_id, body)


@router.get("/tenants/{tenant_id}/adapters")
async def list_adapters(tenant_id: str, core: CoreServices) -> AdapterList:
    return AdapterList(data=await core.adapter_admin.list(tenant_id))


@router.delete("/tenants/{tenant_id}/adapters/{name}")
async def delete_adapter(tenant_id: str, name: str, core: CoreServices) -> AdapterRecord:
    return await core.adapter_admin.delete(tenant_id, name)


@router.get("/usage", response_model=UsageReport)
async def all_usage(
    core: CoreServices, date: ReportDate = None, days: ReportDays = 1, tenant_id: str | None = None
) -> JSONResponse:
    return JSONResponse(await usage_report(core.usage, date=date, days=days, tenant_id=tenant_id))
