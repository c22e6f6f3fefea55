"""HTTP only: GET /v1/models, GET /health, GET /ready."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.deps import Services

router = APIRouter()


@router.get("/v1/models")
async def list_models(services: Services) -> JSONResponse:
    return JSONResponse(services.models.list())


@router.get("/health")
async def health() -> JSONResponse:
    """Liveness: the gateway process answers."""
    return JSONResponse({"status": "ok"})


@router.get("/ready", responses={503: {"description": "A pool has no live replica"}})
async def ready(services: Services) -> JSONResponse:
    """Readiness: every pool has a replica that answers a health round trip."""
    pools = services.catalog.enabled_pools
    answers = list(await asyncio.gather(*(services.router.ready(pool) for pool in pools)))
    status = {pool.name: ("ready" if ok else "unavailable") for pool, ok in zip(pools, answers, strict=True)}
    if services.batch_worker is not None:
        batch_ok = await services.router.ready_handle(services.batch_worker)
        answers.append(batch_ok)
        status["batch-workers"] = "ready" if batch_ok else "unavailable"
    if all(answers):
        return JSONResponse({"status": "ready", "pools": status})
    return JSONResponse({"status": "unavailable", "pools": status}, status_code=503, headers={"Retry-After": "5"})
