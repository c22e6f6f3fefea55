"""Batch workers: read items from the pool streams and run them through the same gateway
services as REST (validation, tenant gate at the `batch` class, fair queue, one handle hop).

The fair queue is what makes this batching: a worker keeps up to `batch_concurrency` items
waiting for pool capacity; they take free slots at the lowest priority class, so the engine's
continuous batch fills up without starving interactive traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from services.batch.metrics import BatchMetrics
from services.batch.queue import BatchQueue, QueueItem, ResultWriter
from services.batch.service import BatchService, error_line, output_line
from services.errors import GenerationFailed, Overloaded, PhiserveError, RateLimited, ServiceUnavailable
from services.gateway.chat.protocol import ChatCompletionRequest
from services.gateway.chat.service import ChatShape
from services.gateway.completions.protocol import CompletionRequest
from services.gateway.deps import GatewayServices
from services.gateway.errors import error_payload, invalid_request_from
from services.gateway.generation import Caller
from services.settings import Settings
from services.tenancy.models import PriorityClass, Tenant

logger = logging.getLogger(__name__)

RETRYABLE = (ServiceUnavailable, GenerationFailed, RateLimited)
MAX_BACKOFF_S = 30.0


class BatchProcessor:
    def __init__(
        self,
        services: GatewayServices,
        queue: BatchQueue,
        batches: BatchService,
        metrics: BatchMetrics,
        *,
        consumer: str,
        concurrency: int,
        max_attempts: int,
        backoff_s: float,
        sweep_interval_s: float,
        stall_after_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._services = services
        self._queue = queue
        self._batches = batches
        self._metrics = metrics
        self._consumer = consumer
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._sweep_interval_s = sweep_interval_s
        self._stall_after_s = stall_after_s
        self._clock = clock
        self._heartbeat = clock()
        self._in_flight: dict[asyncio.Task[None], QueueItem] = {}
        self._writer = ResultWriter(queue)
        self._pools = [pool.name for pool in services.catalog.enabled_pools]

    @classmethod
    def from_settings(
        cls, services: GatewayServices, queue: BatchQueue, metrics: BatchMetrics, settings: Settings, *, consumer: str
    ) -> BatchProcessor:
        return cls(
            services,
            queue,
            services.batches,
            metrics,
            consumer=consumer,
            concurrency=settings.batch_concurrency,
            max_attempts=settings.batch_max_attempts,
            backoff_s=settings.batch_retry_backoff_s,
            sweep_interval_s=settings.batch_sweep_interval_s,
            stall_after_s=settings.batch_loop_stall_s,
        )

    async def check_health(self) -> None:
        """Unhealthy when the loop stopped turning: a call that never returns (issue 9, item 7)
        leaves the task alive, so `task.done()` alone would stay green."""
        stalled = self._clock() - self._heartbeat
        if stalled > self._stall_after_s:
            raise RuntimeError(f"the batch loop has not turned for {stalled:.0f} s")

    async def run(self) -> None:
        self._heartbeat = self._clock()
        await self._queue.ensure_groups()
        next_sweep = 0.0
        while True:
            # Beat on every turn, also after an error: Redis down is not this worker's fault
            # (a new replica would not help); a call that hangs is.
            self._heartbeat = self._clock()
            try:
                if time.monotonic() >= next_sweep:
                    await self._housekeeping()
                    next_sweep = time.monotonic() + self._sweep_interval_s
                free = self._concurrency - len(self._in_flight)
                if free > 0:
                    for item in await self._queue.read(self._consumer, count=free, block_ms=500):
                        self._start(item)
                else:
                    await asyncio.wait(list(self._in_flight), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarting: wait and go on
                logger.warning("batch worker %s: %s; retrying", self._consumer, exc)
                await asyncio.sleep(1.0)

    def _start(self, item: QueueItem) -> None:
        task = asyncio.get_running_loop().create_task(self._process(item))
        self._in_flight[task] = item
        task.add_done_callback(self._in_flight.pop)

    async def _housekeeping(self) -> None:
        if self._in_flight:
            await self._queue.touch(self._consumer, list(self._in_flight.values()))
        free = self._concurrency - len(self._in_flight)
        if free > 0:
            reclaimed = await self._queue.reclaim(self._consumer, count=free)
            for item in reclaimed:
                if item not in self._in_flight.values():
                    self._metrics.items.inc(tags={"outcome": "reclaimed"})
                    self._start(item)
        await self._batches.sweep()
        now_ms = time.time() * 1000
        for pool in self._pools:
            length, _ = await self._queue.depth(pool)
            self._metrics.queue_depth.set(length, tags={"pool": pool})
            self._metrics.queue_lag.set(await self._queue.lag_s(pool, now_ms), tags={"pool": pool})

    async def _process(self, item: QueueItem) -> None:
        try:
            ok, line = await self._run_item(item)
            new, completed, failed, total = await self._writer.write(item, {"ok": ok, "line": line}, ok=ok)
            if new:
                self._metrics.items.inc(tags={"outcome": "completed" if ok else "failed"})
            if completed + failed >= total:
                await self._batches.finalize(item.batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # left un-acknowledged: reclaimed after the visibility timeout
            logger.warning("batch item %s/%s not recorded: %s", item.batch_id, item.line, exc)

    async def _run_item(self, item: QueueItem) -> tuple[bool, dict[str, Any]]:
        item_id = f"{item.batch_id}-{item.line}"
        record = await self._batches.record(item.batch_id)
        if record.get("status") == "cancelling" or record.get("expiring"):
            code = "batch_cancelled" if record.get("status") == "cancelling" else "batch_expired"
            body = {"error": {"message": f"not run: {code.replace('_', ' ')}", "type": "invalid_request_error", "param": None, "code": code}}
            return False, error_line(item_id, item.custom_id, 499, body)
        tenant = (await self._services.tenants.get_tenant(record["tenant_id"])).model_copy(
            update={"priority_class": PriorityClass.batch}
        )
        attempt = 0
        while True:
            try:
                return True, output_line(item_id, item.custom_id, await self._generate(tenant, item, item_id))
            except Overloaded:
                continue  # waited for pool capacity behind interactive traffic: wait again
            except RETRYABLE as exc:
                attempt += 1
                if attempt >= self._max_attempts:
                    return False, self._failure(item, item_id, exc)
                self._metrics.items.inc(tags={"outcome": "retried"})
                delay = exc.retry_after_s or self._backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(float(delay), MAX_BACKOFF_S))
            except PhiserveError as exc:
                return False, self._failure(item, item_id, exc)

    async def _generate(self, tenant: Tenant, item: QueueItem, item_id: str) -> dict[str, Any]:
        caller = Caller(tenant=tenant, labels={"model": "none", "tenant": "batch"})
        services = self._services
        try:
            if item.url == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(item.body)
                pool, request = await services.chat.prepare(chat, item_id, tenant=tenant)
                shape: Any = ChatShape(item_id, chat.model)
            else:
                completion = CompletionRequest.model_validate(item.body)
                pool, request, shape = services.completions.prepare(completion, item_id)
        except ValidationError as exc:
            raise invalid_request_from(exc.errors()) from None
        body, _ = await services.runner.complete(caller, pool, request, shape)
        return dict(body)

    @staticmethod
    def _failure(item: QueueItem, item_id: str, exc: PhiserveError) -> dict[str, Any]:
        status, body, _ = error_payload(exc)
        return error_line(item_id, item.custom_id, status, body)

    async def backlog(self) -> int:
        total = 0
        for pool in self._pools:
            length, _ = await self._queue.depth(pool)
            total += length
        return total

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stop(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
