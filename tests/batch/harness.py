"""A real batch worker outside Ray: the core `build_core` wires (real Redis,
real fair queue and admission), a `BatchProcessor` and its loop, no pool handles. Items that
would reach an engine are never granted a slot in these tests (the pool is kept full)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from services.batch.api import build_batch_api
from services.batch.files import FileService
from services.batch.metrics import BatchMetrics
from services.batch.queue import BatchQueue
from services.batch.service import BatchService
from services.batch.worker import BatchProcessor
from services.catalog.loader import load_catalog
from services.inference.core import Core, build_core
from services.redis_store import RedisStore
from services.settings import Settings
from services.tenancy.fair_queue import FairQueue
from services.tenancy.models import Tenant
from tests.conftest import CACHE_DIR

POOL = "text"
MODEL = "phi-3.5-mini"


def worker_settings(redis_url: str, tmp_files: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": CACHE_DIR,
        "redis_url": redis_url,
        "files_dir": tmp_files,
        "batch_concurrency": 4,
        "batch_sweep_interval_s": 0.2,
        "batch_visibility_timeout_s": 30.0,
        "batch_retry_backoff_s": 0.3,
        "queue_timeout_s": 0.2,
        "max_waiting_per_pool": 1,
        "lease_ttl_s": 30.0,
        **overrides,
    }
    return Settings(**values)


@dataclass
class Worker:
    settings: Settings
    core: Core
    files: FileService
    batches: BatchService
    state: RedisStore
    processor: BatchProcessor
    queue: BatchQueue


def build_worker(settings: Settings, *, consumer: str = "w1") -> Worker:
    catalog = load_catalog("local")
    core = build_core(settings, catalog, {})
    files, batches = build_batch_api(core, settings)
    queue = BatchQueue(
        core.redis,
        [pool.name for pool in catalog.enabled_pools],
        visibility_timeout_s=settings.batch_visibility_timeout_s,
    )
    processor = BatchProcessor.from_settings(
        core, queue, batches, BatchMetrics(), settings, consumer=consumer
    )
    return Worker(settings, core, files, batches, core.redis, processor, queue)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(worker.processor.run())
    try:
        yield task
    finally:
        worker.processor.stop()
        task.cancel()
        # Bounded: a worker step shielded from the cancel must not hold the test forever.
        await asyncio.wait({task}, timeout=5)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(worker.state.close(), 5)


@contextlib.asynccontextmanager
async def full_pool(worker: Worker, pool: str = POOL) -> AsyncIterator[None]:
    """Another tenant takes every slot of the pool and one waits: the waiting room
    (max_waiting_per_pool=1) is full, so a batch item's admission is refused at once
    with Overloaded, as behind a burst of interactive traffic."""
    capacity = next(p.capacity for p in worker.core.catalog.enabled_pools if p.name == pool)
    queue = FairQueue(worker.state, {pool: capacity}, max_waiting=1, lease_ttl_s=30.0)
    grants = [
        await queue.acquire(pool, tenant_id="interactive", cost=1, weight=1, priority=0, timeout_s=1)
        for _ in range(capacity)
    ]
    waiter = asyncio.get_running_loop().create_task(
        queue.acquire(pool, tenant_id="interactive", cost=1, weight=1, priority=0, timeout_s=120)
    )
    try:
        yield
    finally:
        waiter.cancel()
        # Bounded: when `running` closed the worker's Redis clients first, the waiter's
        # shielded withdraw has no connection to finish on.
        await asyncio.wait({waiter}, timeout=5)
        for grant in grants:
            with contextlib.suppress(Exception):
                await queue.release(grant)


async def add_tenant(worker: Worker, tenant_id: str, **fields: Any) -> Tenant:
    return await worker.core.tenants.put_tenant(Tenant(id=tenant_id, **fields))


def jsonl(n: int, *, model: str = MODEL) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": model, "prompt": f"item {i}", "max_tokens": 4},
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()
