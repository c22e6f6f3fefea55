"""HTTP only: GET /v1/models, GET|DELETE /v1/models/{model}, GET /health, GET /ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.deps import CoreServices, CurrentTenant, LimitedTenant, presented_key
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.responses import Health, Model, ModelDeleted, ModelList, ReadyStatus

router = APIRouter()


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses={status: ERROR_RESPONSES[status] for status in (401, 503)},
)
async def list_models(request: Request, core: CoreServices) -> JSONResponse:
    """Public: every served model. With a tenant's key, the models that tenant may use and
    its own fine-tuned adapters (as GET /v1/models/{model} answers them); an unknown key is a
    401, as on any tenant route."""
    key = presented_key(request)
    tenant = (await core.tenants.authenticate(key))[0] if key else None
    return JSONResponse(await core.models.list(tenant))


# `path`: served names hold '/' (microsoft/Phi-3.5-mini-instruct) and '.'.
@router.get("/v1/models/{model:path}", response_model=Model, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, tenant: CurrentTenant, core: CoreServices) -> JSONResponse:
    """A model of the list; 404 when it is not served, the tenant may not use it or it is
    another tenant's adapter."""
    return JSONResponse(await core.models.retrieve(tenant, model))


@router.delete("/v1/models/{model:path}", response_model=ModelDeleted, responses=ERROR_RESPONSES)
async def delete_model(model: str, tenant: LimitedTenant, core: CoreServices) -> JSONResponse:
    """Deletes one of the tenant's own adapters (`ft:...`), as OpenAI's models.delete; the
    same 404 as GET for anything else, 403 for a served base model."""
    return JSONResponse(await core.models.delete(tenant, model))


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
