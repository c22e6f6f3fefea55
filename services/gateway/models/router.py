"""HTTP only: GET /v1/models, GET /health, GET /ready."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.deps import CoreServices
from services.inference.protocol.responses import Health, ModelList, ReadyStatus

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(core: CoreServices) -> JSONResponse:
    return JSONResponse(core.models.list())


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
