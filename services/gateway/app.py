"""The gateway's FastAPI app, built from ready services (no globals, nothing at import)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.catalog.models import Catalog
from services.gateway.chat.router import router as chat_router
from services.gateway.chat.service import ChatService
from services.gateway.completions.router import router as completions_router
from services.gateway.completions.service import CompletionService
from services.gateway.deps import GatewayServices
from services.gateway.errors import install_error_handlers
from services.gateway.generation import GenerationRunner
from services.gateway.images import ImageLoader
from services.gateway.middleware import GatewayMiddleware
from services.gateway.models.router import router as models_router
from services.gateway.models.service import ModelsService
from services.gateway.pools import PoolRouter
from services.settings import Settings


def build_services(catalog: Catalog, handles: dict[str, Any], settings: Settings) -> GatewayServices:
    router = PoolRouter(catalog, handles, assign_timeout_s=settings.pool_ready_timeout_s)
    runner = GenerationRunner(router)
    images = ImageLoader(
        allow_remote=settings.allow_remote_image_urls,
        max_bytes=settings.max_request_body_bytes,
        timeout_s=settings.remote_image_timeout_s,
    )
    return GatewayServices(
        catalog=catalog,
        router=router,
        chat=ChatService(router, runner, images, platform=catalog.platform),
        completions=CompletionService(router, runner, platform=catalog.platform),
        models=ModelsService(catalog),
    )


def create_app(services: GatewayServices, settings: Settings) -> FastAPI:
    app = FastAPI(title="phiserve", version="0.1.0", summary="OpenAI-compatible gateway for Phi models")
    app.state.services = services
    install_error_handlers(app)
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(models_router)
    app.add_middleware(GatewayMiddleware, max_body_bytes=settings.max_request_body_bytes)
    return app
