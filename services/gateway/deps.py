"""Typed FastAPI dependencies so routes read as prose."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from services.batch.files import FileService
from services.batch.service import BatchService
from services.catalog.models import Catalog
from services.errors import AuthenticationFailed, PermissionDenied
from services.gateway.api_limits import ApiRequestLimiter
from services.gateway.chat.service import ChatService
from services.gateway.completions.service import CompletionService
from services.gateway.gate import client_deadline_s
from services.gateway.generation import Caller, GenerationRunner
from services.gateway.metrics import tenant_label
from services.gateway.middleware import presented_key as _key_in_headers
from services.gateway.models.service import ModelsService
from services.gateway.pools import PoolRouter
from services.gateway.readiness import Readiness
from services.tenancy.models import Tenant
from services.tenancy.store import TenantStore
from services.tenancy.usage import UsageLedger


@dataclass(frozen=True)
class GatewayServices:
    catalog: Catalog
    router: PoolRouter
    runner: GenerationRunner
    chat: ChatService
    completions: CompletionService
    models: ModelsService
    tenants: TenantStore
    usage: UsageLedger
    files: FileService
    batches: BatchService
    api_limiter: ApiRequestLimiter  # RPM for the files, batches and usage routes
    readiness: Readiness  # /ready's pool round trips, cached for a second
    admin_key: str | None
    batch_worker: Any = None  # handle to the batch worker deployment, for /ready


# async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
async def _services(request: Request) -> GatewayServices:
    services: GatewayServices = request.app.state.services
    return services


async def _request_id(request: Request) -> str:
    return str(request.state.request_id)


def presented_key(request: Request) -> str | None:
    return _key_in_headers(request.headers)


async def _tenant(request: Request, services: Annotated[GatewayServices, Depends(_services)]) -> Tenant:
    # The middleware authenticated the key before the body was read; no second lookup.
    authenticated: Tenant | None = request.scope.get("state", {}).get("tenant")
    if authenticated is not None:
        return authenticated
    tenant, _ = await services.tenants.authenticate(presented_key(request))
    return tenant


async def _limited_tenant(
    tenant: Annotated[Tenant, Depends(_tenant)], services: Annotated[GatewayServices, Depends(_services)]
) -> Tenant:
    await services.api_limiter.count(tenant)
    return tenant


async def _caller(request: Request, tenant: Annotated[Tenant, Depends(_tenant)]) -> Caller:
    # The middleware records the response under these labels once it is sent.
    labels: dict[str, str] = request.state.metric_labels
    labels["tenant"] = tenant_label(tenant.id, tenant.metrics_label)
    return Caller(
        tenant=tenant,
        deadline_s=client_deadline_s(dict(request.headers)),
        started=request.state.started,
        labels=labels,
    )


async def _admin(request: Request, services: Annotated[GatewayServices, Depends(_services)]) -> None:
    key = presented_key(request)
    if not key:
        raise AuthenticationFailed("Missing admin key: send 'Authorization: Bearer <admin key>'")
    if services.admin_key is None or not hmac.compare_digest(key.encode(), services.admin_key.encode()):
        # A valid tenant key is still not an admin key: same answer as a wrong one.
        raise PermissionDenied("This route needs the admin key", code="admin_only")


Services = Annotated[GatewayServices, Depends(_services)]
RequestId = Annotated[str, Depends(_request_id)]
CurrentTenant = Annotated[Tenant, Depends(_tenant)]
# Files, batches and usage: the caller's tenant, counted against its RPM (issue 9, item 4).
LimitedTenant = Annotated[Tenant, Depends(_limited_tenant)]
CurrentCaller = Annotated[Caller, Depends(_caller)]
AdminOnly = Depends(_admin)
