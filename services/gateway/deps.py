"""Typed FastAPI dependencies so routes read as prose."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.errors import AuthenticationFailed, PermissionDenied
from services.inference.core import Core
from services.inference.gate import client_deadline_s
from services.inference.generation import Caller
from services.inference.identity import presented_key as _key_in_headers
from services.inference.metrics import tenant_label
from services.inference.ports import BatchApi, BatchApis, FileApi
from services.tenancy.models import Tenant


# async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
async def _core(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


async def _files(request: Request) -> FileApi:
    apis: BatchApis = request.app.state.batch_apis
    return apis.files


async def _batches(request: Request) -> BatchApi:
    apis: BatchApis = request.app.state.batch_apis
    return apis.batches


def presented_key(request: Request) -> str | None:
    return _key_in_headers(request.headers)


async def _tenant(request: Request, core: Annotated[Core, Depends(_core)]) -> Tenant:
    # The middleware authenticated the key before the body was read; no second lookup.
    authenticated: Tenant | None = request.scope.get("state", {}).get("tenant")
    if authenticated is not None:
        return authenticated
    tenant, _ = await core.tenants.authenticate(presented_key(request))
    return tenant


async def _limited_tenant(
    tenant: Annotated[Tenant, Depends(_tenant)], core: Annotated[Core, Depends(_core)]
) -> Tenant:
    await core.api_limiter.count(tenant)
    return tenant


@dataclass(frozen=True)
class GenerationCall:
    """What a generation route needs: the core, the caller and the request id."""

    core: Core
    caller: Caller
    request_id: str


async def _generation_call(request: Request) -> GenerationCall:
    # One dependency, not core + caller (+ tenant) + request id: FastAPI resolves each
    # dependency of the two hottest routes on every request (~25 us for the four, issue 12).
    core = await _core(request)
    tenant = await _tenant(request, core)
    # The middleware records the response under these labels once it is sent.
    labels: dict[str, str] = request.state.metric_labels
    labels["tenant"] = tenant_label(tenant.id, tenant.metrics_label)
    caller = Caller(
        tenant=tenant,
        deadline_s=client_deadline_s(dict(request.headers)),
        started=request.state.started,
        labels=labels,
    )
    return GenerationCall(core, caller, str(request.state.request_id))


async def _admin(request: Request, core: Annotated[Core, Depends(_core)]) -> None:
    key = presented_key(request)
    if not key:
        raise AuthenticationFailed("Missing admin key: send 'Authorization: Bearer <admin key>'")
    if core.admin_key is None or not hmac.compare_digest(key.encode(), core.admin_key.encode()):
        # A valid tenant key is still not an admin key: same answer as a wrong one.
        raise PermissionDenied("This route needs the admin key", code="admin_only")


CoreServices = Annotated[Core, Depends(_core)]
Files = Annotated[FileApi, Depends(_files)]
Batches = Annotated[BatchApi, Depends(_batches)]
CurrentTenant = Annotated[Tenant, Depends(_tenant)]
# Files, batches and usage: the caller's tenant, counted against its RPM (issue 9, item 4).
LimitedTenant = Annotated[Tenant, Depends(_limited_tenant)]
Generation = Annotated[GenerationCall, Depends(_generation_call)]
AdminOnly = Depends(_admin)
