"""The gateway's FastAPI app, built from ready services (no globals, nothing at import)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import yaml
from fastapi import FastAPI

from services.gateway.admin.router import router as admin_router
from services.gateway.batches.router import router as batches_router
from services.gateway.chat.router import router as chat_router
from services.gateway.completions.router import router as completions_router
from services.gateway.disconnect import CancelOnDisconnect
from services.gateway.errors import install_error_handlers
from services.gateway.files.router import router as files_router
from services.gateway.middleware import GENERATION_PATHS, GatewayMiddleware
from services.gateway.models.router import router as models_router
from services.gateway.openapi import install_openapi
from services.gateway.tokenize.router import router as tokenize_router
from services.gateway.usage.router import router as usage_router
from services.inference.core import Core
from services.inference.ports import BatchApis
from services.settings import Settings
from services.tenancy.models import PriorityClass, Tenant, TenantsFile
from services.tenancy.store import TenantStore

logger = logging.getLogger(__name__)

DEMO_TENANT = Tenant(id="demo", name="Local demo tenant", priority_class=PriorityClass.interactive)


async def bootstrap_tenants(store: TenantStore, settings: Settings) -> None:
    """Idempotent: the tenants file, and in the local profile the demo tenant."""
    if settings.tenants_file is not None:
        raw = yaml.safe_load(settings.tenants_file.read_text()) or {}
        await store.bootstrap(TenantsFile.model_validate(raw))
    if settings.is_local and settings.api_key is not None:
        await store.put_tenant(DEMO_TENANT)
        await store.ensure_key(DEMO_TENANT.id, settings.api_key.get_secret_value(), name="demo")


def create_app(core: Core, batch_apis: BatchApis, settings: Settings) -> FastAPI:
    """The HTTP adapter over a built core. The app owns the core's lifecycle: its lifespan
    starts the lease keeper and closes Redis."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await bootstrap_tenants(core.tenants, settings)
        except Exception as exc:  # noqa: BLE001 - Redis may come later; auth fails closed meanwhile
            logger.error("tenant bootstrap failed (will serve 503 until Redis answers): %s", exc)
        core.start()
        yield
        await core.close()

    app = FastAPI(
        title="phiserve",
        version="0.1.0",
        summary="OpenAI-compatible, multi-tenant gateway for Phi models",
        lifespan=lifespan,
    )
    app.state.core = core
    app.state.batch_apis = batch_apis
    app.state.metrics = core.metrics
    install_error_handlers(app)
    install_openapi(app)
    for router in (
        chat_router,
        completions_router,
        models_router,
        tokenize_router,
        usage_router,
        files_router,
        batches_router,
        admin_router,
    ):
        app.include_router(router)
    # Inside GatewayMiddleware (added after, so outermost): a client gone is a 499 there.
    app.add_middleware(CancelOnDisconnect, paths=GENERATION_PATHS)
    app.add_middleware(
        GatewayMiddleware,
        max_body_bytes=settings.max_request_body_bytes,
        max_upload_bytes=settings.max_batch_file_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
        metrics=core.metrics,
        tenants=core.tenants,
    )
    return app
