"""The batch worker as a Ray Serve deployment: no HTTP, one processing loop per replica."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve

from services.batch.api import build_batch_api
from services.batch.autoscaling import BACKLOG_METRIC
from services.batch.metrics import BatchMetrics
from services.batch.queue import BatchQueue
from services.batch.worker import BatchProcessor
from services.catalog.models import Catalog
from services.inference.core import build_core
from services.settings import Settings


class BatchWorker:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, catalog: Catalog, settings: Settings, pool_handles: dict[str, Any]
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._core = build_core(settings, catalog, pool_handles)
        _, batches = build_batch_api(self._core, settings)
        context = serve.get_replica_context()
        consumer = f"worker-{context.replica_id.unique_id}"
        queue = BatchQueue(
            self._core.redis,
            [pool.name for pool in catalog.enabled_pools],
            visibility_timeout_s=settings.batch_visibility_timeout_s,
        )
        self._processor = BatchProcessor.from_settings(
            self._core, queue, batches, BatchMetrics(), settings, consumer=consumer
        )
        self._core.start()
        self._task = asyncio.get_running_loop().create_task(self._processor.run())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: items waiting in the pool streams (stream lag)."""
        return {BACKLOG_METRIC: float(await self._processor.backlog())}

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError(f"the batch loop stopped: {self._task.exception()!r}")
        await self._processor.check_health()

    async def diagnostics(self) -> dict[str, object]:
        """For operators and tests: this worker's process and what it holds."""
        import os

        return {"pid": os.getpid(), "in_flight": self._processor.in_flight}

    async def ready(self) -> str:
        await self.check_health()
        return "batch"

    def __del__(self) -> None:
        processor = getattr(self, "_processor", None)
        if processor is not None:
            processor.stop()
