"""HTTP only: GET /v1/models, GET /v1/models/{model}, GET /health, GET /ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.deps import CoreServices, CurrentTenant, presented_key
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.responses import Health, Model, ModelList, ReadyStatus

router = APIRouter()


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses={status: ERROR_RESPONSES[status] for status in (401, 503)},
)
async def list_models(request: Request, core: CoreServices) -> JSONResponse:
    """Public: every served model. With a tenant's key, the models that tenant may use (as
    GET /v1/models/{model} answers it); an unknown key is a 401, as on any tenant route."""
    key = presented_key(request)
    tenant = (await core.tenants.authenticate(key))[0] if key else None
    return JSONResponse(core.models.list(tenant))


# `path`: served names hold '/' (microsoft/Phi-3.5-mini-instruct) and '.'.
@router.get("/v1/models/{model:path}", response_model=Model, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, tenant: CurrentTenant, core: CoreServices) -> JSONResponse:
    """A model of the list; 404 when it is not served or the tenant may not use it."""
    return JSONResponse(core.models.retrieve(tenant, model))


@router.get("/health", response_model=Health)
async def health() -> JSONResponse:
    """Liveness: the gateway process answers."""
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    response_model=ReadyStatus,
    responses={503: {"description": "A pool has no live replica", "model": ReadyStatus}},
)
async def ready(core: CoreServices) -> JSONResponse:
    """Readiness: every pool has a replica that answers a health round trip (cached ~1 s)."""
    answer = await core.readiness.check()
    if answer.ready:
        return JSONResponse({"status": "ready", "pools": answer.parts})
    return JSONResponse(
        {"status": "unavailable", "pools": answer.parts}, status_code=503, headers={"Retry-After": "5"}
    )
