"""The transport-neutral core, built once per replica by `build_core`.

Every adapter (the FastAPI app, the gRPC server, the batch worker) receives a `Core` and
calls its services; none of them builds a service of its own or imports another adapter.
The Files and Batches APIs are built by services/batch/ on top of the core
(`services.batch.api.build_batch_api`) and reach the adapters through `inference.ports`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.catalog.models import Catalog
from services.inference.adapter_admin import AdapterAdmin
from services.inference.adapter_models import ModelResolver
from services.inference.api_limits import ApiRequestLimiter
from services.inference.capacity import LiveReplicas, PoolCapacity, serve_live_replicas
from services.inference.chat import ChatService
from services.inference.chat_template import ChatTemplates
from services.inference.completions import CompletionService
from services.inference.gate import LeaseKeeper, TenantGate
from services.inference.generation import GenerationRunner
from services.inference.images import ImageLoader
from services.inference.metrics import GatewayMetrics
from services.inference.model_list import ModelsService
from services.inference.ports import PoolHandle
from services.inference.readiness import Readiness
from services.inference.router import PoolRouter
from services.inference.tokenize import TokenizeService
from services.inference.tokens import TokenCounter
from services.pools.adapter_sources import AdapterSources
from services.redis_store import RedisStore
from services.settings import Settings
from services.tenancy.adapters import AdapterRegistry
from services.tenancy.admission import Admission
from services.tenancy.cache_salt import CacheSalts
from services.tenancy.end_users import EndUserIds
from services.tenancy.entry import TenancySteps
from services.tenancy.fair_queue import FairQueue
from services.tenancy.store import TenantStore
from services.tenancy.usage import UsageLedger


@dataclass(frozen=True)
class Core:
    catalog: Catalog
    router: PoolRouter
    resolver: ModelResolver  # a request's model -> its pool and the tenant's adapter
    adapters: AdapterRegistry  # tenants' LoRA adapter records (issue 14)
    adapter_admin: AdapterAdmin  # registers, lists and deletes them (the admin API)
    runner: GenerationRunner
    chat: ChatService
    completions: CompletionService
    tokens: TokenCounter  # the models' own tokenizers (admission counts, /tokenize)
    tokenize: TokenizeService  # /tokenize and /detokenize, on `tokens`
    models: ModelsService
    tenants: TenantStore
    usage: UsageLedger
    api_limiter: ApiRequestLimiter  # RPM for the files, batches and usage routes
    readiness: Readiness  # /ready's pool round trips, cached for a second
    metrics: GatewayMetrics
    redis: RedisStore  # owned: closed by `close()`
    keeper: LeaseKeeper  # renews this replica's leases while it runs
    admin_key: str | None

    def start(self) -> None:
        self.keeper.start()

    async def close(self) -> None:
        self.keeper.stop()
        await self.redis.close()


def build_core(
    settings: Settings,
    catalog: Catalog,
    handles: Mapping[str, PoolHandle],
    *,
    batch_worker: PoolHandle | None = None,  # a Serve handle with `ready`, like a pool
    live_replicas: LiveReplicas | None = None,
) -> Core:
    redis = RedisStore(settings.redis_url)
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
    tokens = TokenCounter.for_pools(catalog.enabled_pools, settings.model_dir.resolve())
    tenants = TenantStore(redis, tenant_cache_ttl_s=settings.tenant_cache_ttl_s)
    gate = TenantGate(
        TenancySteps(redis, admission, fair_queue),
        tenants,
        tokens,
        keeper,
        metrics,
        queue_timeout_s=settings.queue_timeout_s,
        long_pools={
            pool.name: long for pool in catalog.enabled_pools if (long := catalog.long_pool_of(pool))
        },
    )
    secret = settings.cache_salt_secret.get_secret_value() if settings.cache_salt_secret else None
    runner = GenerationRunner(router, gate, metrics, cache_salts=CacheSalts.from_secret(secret))
    end_users = EndUserIds.from_secret(secret)  # the `user` field, hashed for the logs
    images = ImageLoader(
        allow_remote=settings.allow_remote_image_urls,
        max_bytes=settings.max_request_body_bytes,
        timeout_s=settings.remote_image_timeout_s,
    )
    adapters = AdapterRegistry(redis)
    resolver = ModelResolver(router, adapters, ttl_s=settings.adapter_cache_ttl_s)
    chat = ChatService(resolver, runner, images, platform=catalog.platform, end_users=end_users)
    templates = ChatTemplates.for_pools(catalog.enabled_pools, settings.model_dir.resolve())
    return Core(
        catalog=catalog,
        router=router,
        resolver=resolver,
        adapters=adapters,
        adapter_admin=AdapterAdmin(
            catalog,
            adapters,
            tenants,
            AdapterSources(settings.adapter_store_dir, settings.adapter_roots),
            model_dir=settings.model_dir.resolve(),
            max_adapter_bytes=settings.max_adapter_bytes,
        ),
        runner=runner,
        chat=chat,
        completions=CompletionService(
            resolver, runner, tokens, platform=catalog.platform, end_users=end_users
        ),
        tokens=tokens,
        tokenize=TokenizeService(resolver, chat, tokens, templates),
        models=ModelsService(catalog, settings.model_dir.resolve(), adapters),
        tenants=tenants,
        usage=UsageLedger(redis),
        api_limiter=ApiRequestLimiter(admission, metrics),
        readiness=Readiness(
            router, catalog.enabled_pools, batch_worker=batch_worker, ttl_s=settings.ready_cache_ttl_s
        ),
        metrics=metrics,
        redis=redis,
        keeper=keeper,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
