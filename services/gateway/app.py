"""The gateway's FastAPI app, built from ready services (no globals, nothing at import)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import yaml
from fastapi import FastAPI

from services.batch.files import FileService, LocalFileStore
from services.batch.service import BatchService
from services.catalog.models import Catalog
from services.gateway.admin.router import router as admin_router
from services.gateway.api_limits import ApiRequestLimiter
from services.gateway.batches.router import router as batches_router
from services.gateway.capacity import LiveReplicas, PoolCapacity, serve_live_replicas
from services.gateway.chat.router import router as chat_router
from services.gateway.chat.service import ChatService
from services.gateway.completions.router import router as completions_router
from services.gateway.completions.service import CompletionService
from services.gateway.deps import GatewayServices
from services.gateway.disconnect import CancelOnDisconnect
from services.gateway.errors import install_error_handlers
from services.gateway.files.router import router as files_router
from services.gateway.gate import LeaseKeeper, TenantGate
from services.gateway.generation import GenerationRunner
from services.gateway.images import ImageLoader
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import GENERATION_PATHS, GatewayMiddleware
from services.gateway.models.router import router as models_router
from services.gateway.models.service import ModelsService
from services.gateway.pools import PoolRouter
from services.gateway.readiness import Readiness
from services.gateway.tokens import TokenCounter
from services.gateway.usage.router import router as usage_router
from services.settings import Settings
from services.tenancy.admission import Admission
from services.tenancy.cache_salt import CacheSalts
from services.tenancy.fair_queue import FairQueue
from services.tenancy.models import PriorityClass, Tenant, TenantsFile
from services.tenancy.redis_state import RedisState
from services.tenancy.store import TenantStore
from services.tenancy.usage import UsageLedger

logger = logging.getLogger(__name__)

DEMO_TENANT = Tenant(id="demo", name="Local demo tenant", priority_class=PriorityClass.interactive)


class GatewayState:
    """What the gateway replica owns: the Redis clients and the lease keeper."""

    def __init__(self, redis: RedisState, keeper: LeaseKeeper, metrics: GatewayMetrics) -> None:
        self.redis = redis
        self.keeper = keeper
        self.metrics = metrics


def build_services(
    catalog: Catalog,
    handles: dict[str, Any],
    settings: Settings,
    *,
    batch_worker: Any = None,
    live_replicas: LiveReplicas | None = None,
) -> tuple[GatewayServices, GatewayState]:
    redis = RedisState(settings.redis_url)
    router = PoolRouter(catalog, handles, assign_timeout_s=settings.pool_ready_timeout_s)
    admission = Admission(redis, lease_ttl_s=settings.lease_ttl_s, fail_open=settings.fail_open_limits)
    fair_queue = FairQueue(
        redis,
        {pool.name: pool.capacity for pool in catalog.enabled_pools},
        max_waiting=settings.max_waiting_per_pool,
        lease_ttl_s=settings.lease_ttl_s,
        ticket_ttl_s=settings.queue_ticket_ttl_s,
        max_waiting_per_tenant=settings.max_waiting_per_tenant,
        policy=settings.queue_policy,
        fail_open=settings.fail_open_limits,
    )
    usage = UsageLedger(redis)
    metrics = GatewayMetrics()
    keeper = LeaseKeeper(
        admission,
        fair_queue,
        metrics,
        pools=[pool.name for pool in catalog.enabled_pools],
        interval_s=settings.lease_ttl_s / 3,
        capacity=PoolCapacity(
            catalog.enabled_pools, fair_queue, live_replicas or serve_live_replicas(handles)
        ),
    )
    gate = TenantGate(
        admission,
        fair_queue,
        TokenCounter.for_pools(catalog.enabled_pools, settings.model_dir.resolve()),
        keeper,
        metrics,
        queue_timeout_s=settings.queue_timeout_s,
    )
    secret = settings.cache_salt_secret.get_secret_value() if settings.cache_salt_secret else None
    runner = GenerationRunner(router, gate, metrics, cache_salts=CacheSalts.from_secret(secret))
    images = ImageLoader(
        allow_remote=settings.allow_remote_image_urls,
        max_bytes=settings.max_request_body_bytes,
        timeout_s=settings.remote_image_timeout_s,
    )
    files = FileService(
        redis,
        LocalFileStore(settings.batch_files_dir),
        max_bytes=settings.max_batch_file_bytes,
        max_lines=settings.max_batch_lines,
        max_files=settings.tenant_max_files,
        max_stored_bytes=settings.tenant_max_file_bytes,
    )
    services = GatewayServices(
        catalog=catalog,
        router=router,
        runner=runner,
        chat=ChatService(router, runner, images, platform=catalog.platform),
        completions=CompletionService(router, runner, platform=catalog.platform),
        models=ModelsService(catalog),
        tenants=TenantStore(redis, tenant_cache_ttl_s=settings.tenant_cache_ttl_s),
        usage=usage,
        files=files,
        batches=BatchService(
            redis,
            files,
            router,
            max_active=settings.tenant_max_active_batches,
            max_queued_items=settings.tenant_max_queued_items,
            enqueue_chunk=settings.batch_enqueue_chunk,
            retention_s=settings.batch_retention_s,
        ),
        batch_worker=batch_worker,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        api_limiter=ApiRequestLimiter(admission, metrics),
        readiness=Readiness(
            router, catalog.enabled_pools, batch_worker=batch_worker, ttl_s=settings.ready_cache_ttl_s
        ),
    )
    return services, GatewayState(redis, keeper, metrics)


async def bootstrap_tenants(store: TenantStore, settings: Settings) -> None:
    """Idempotent: the tenants file, and in the local profile the demo tenant."""
    if settings.tenants_file is not None:
        raw = yaml.safe_load(settings.tenants_file.read_text()) or {}
        await store.bootstrap(TenantsFile.model_validate(raw))
    if settings.is_local and settings.api_key is not None:
        await store.put_tenant(DEMO_TENANT)
        await store.ensure_key(DEMO_TENANT.id, settings.api_key.get_secret_value(), name="demo")


def create_app(services: GatewayServices, state: GatewayState, settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await bootstrap_tenants(services.tenants, settings)
        except Exception as exc:  # Redis may come later; auth fails closed meanwhile
            logger.error("tenant bootstrap failed (will serve 503 until Redis answers): %s", exc)
        state.keeper.start()
        yield
        state.keeper.stop()
        await state.redis.close()

    app = FastAPI(
        title="phiserve",
        version="0.1.0",
        summary="OpenAI-compatible, multi-tenant gateway for Phi models",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.metrics = state.metrics
    install_error_handlers(app)
    for router in (
        chat_router, completions_router, models_router, usage_router, files_router, batches_router, admin_router
    ):
        app.include_router(router)
    # Inside GatewayMiddleware (added after, so outermost): a client gone is a 499 there.
    app.add_middleware(CancelOnDisconnect, paths=GENERATION_PATHS)
    app.add_middleware(
        GatewayMiddleware,
        max_body_bytes=settings.max_request_body_bytes,
        max_upload_bytes=settings.max_batch_file_bytes,
        max_json_body_bytes=settings.max_json_body_bytes,
        metrics=state.metrics,
        tenants=services.tenants,
    )
    return app
