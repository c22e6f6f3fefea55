"""Batch workers: read items from the pool streams and run them through the same gateway
services as REST (validation, tenant gate at the `batch` class, fair queue, one handle hop).

The fair queue is what makes this batching: a worker keeps up to `batch_concurrency` items
waiting for pool capacity; they take free slots at the lowest priority class, so the engine's
continuous batch fills up without starving interactive traffic.

Under pressure (issue 9, item 8): an item refused for capacity or by its tenant's limits
waits and tries again, spaced by a jittered exponential backoff (each try is a request on
the tenant's rate window); before every try the batch and the tenant are read again, so a
cancel, an expiry or a disabled tenant stops the item; an item handed out more than
`max_deliveries` times (its workers kept dying on it) goes to the error file unrun.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from services.batch.metrics import BatchMetrics
from services.batch.queue import BatchQueue, QueueItem, ResultWriter
from services.batch.service import BatchService, output_line
from services.errors import (
    GenerationFailed,
    InvalidRequest,
    NoLiveReplica,
    Overloaded,
    PermissionDenied,
    PhiserveError,
    RateLimited,
    ServiceUnavailable,
)
from services.inference.core import Core
from services.inference.errors import batch_error_line, invalid_request_from
from services.inference.generation import Caller
from services.inference.protocol.batches import BatchStatus
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.completions import CompletionRequest
from services.settings import Settings
from services.tenancy.models import PriorityClass, Tenant

logger = logging.getLogger(__name__)

GONE, VALIDATING = object(), object()  # `_stop_reason` answers besides a tenant or an error

# Counted against max_attempts: the engine or a replica failed.
RETRYABLE = (ServiceUnavailable, GenerationFailed)
# Not counted: the pool is busy, has no replica (starting, or its node is gone: issue 15), or
# the tenant is at its limits; nothing ran, and a batch waits its turn.
WAITS = (Overloaded, RateLimited, NoLiveReplica)
# A wait that cannot end: the request alone is larger than the tenant's tokens per minute.
NEVER_FITS = {"request_exceeds_tpm"}
VALIDATING_POLL_S = 0.2

# Runs one item as its tenant and answers the response body: the core's chat or completions
# service by default; the queue benchmark passes a stand-in so it measures the queue alone.
ItemGenerator = Callable[[Tenant, QueueItem, str], Awaitable[dict[str, Any]]]


class BatchProcessor:
    def __init__(
        self,
        core: Core,
        queue: BatchQueue,
        batches: BatchService,
        metrics: BatchMetrics,
        *,
        consumer: str,
        concurrency: int,
        max_attempts: int,
        backoff_s: float,
        sweep_interval_s: float,
        max_backoff_s: float = 30.0,
        max_deliveries: int = 5,
        stall_after_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        generate: ItemGenerator | None = None,
        pool_share: float = 1.0,
    ) -> None:
        self._core = core
        self._generate = generate or self._generate_on_core
        self._queue = queue
        self._batches = batches
        self._metrics = metrics
        self._consumer = consumer
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_deliveries = max_deliveries
        self._jitter = jitter
        self._sweep_interval_s = sweep_interval_s
        self._stall_after_s = stall_after_s
        self._clock = clock
        self._heartbeat = clock()
        self._stopped = False
        self._in_flight: dict[asyncio.Task[None], QueueItem] = {}
        self._room = asyncio.Event()  # set when an item finishes: the loop may read more
        self._recording = 0  # items whose result is being written: no longer hold a slot
        self._tenant_of: dict[str, str] = {}  # batch id -> its tenant (never changes)
        self._recorded: collections.Counter[str] = collections.Counter()  # outcomes not yet published
        self._writer = ResultWriter(queue, in_flight=self._in_flight.__len__)
        self._pools = [pool.name for pool in core.catalog.enabled_pools]
        # Items generating at once per pool: a share of its capacity, so that interactive
        # requests find a free slot instead of waiting for a batch generation to end.
        self._generating = {
            pool.name: asyncio.Semaphore(max(1, int(pool.capacity * pool_share)))
            for pool in core.catalog.enabled_pools
        }

    @classmethod
    def from_settings(
        cls,
        core: Core,
        queue: BatchQueue,
        batches: BatchService,
        metrics: BatchMetrics,
        settings: Settings,
        *,
        consumer: str,
        generate: ItemGenerator | None = None,
    ) -> BatchProcessor:
        return cls(
            core,
            queue,
            batches,
            metrics,
            consumer=consumer,
            concurrency=settings.batch_concurrency,
            max_attempts=settings.batch_max_attempts,
            backoff_s=settings.batch_retry_backoff_s,
            sweep_interval_s=settings.batch_sweep_interval_s,
            max_backoff_s=settings.batch_retry_max_backoff_s,
            max_deliveries=settings.batch_max_deliveries,
            stall_after_s=settings.batch_loop_stall_s,
            generate=generate,
            pool_share=settings.batch_pool_share,
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
        # Not only the task's cancel ends the loop: on Python 3.11 a cancel that lands as a
        # Redis read times out can be swallowed (asyncio.timeout's race), and the loop then
        # kept reading items after `stop()` (seen as a stopped test worker taking the next
        # test's item).
        while not self._stopped:
            # Beat on every turn, also after an error: Redis down is not this worker's fault
            # (a new replica would not help); a call that hangs is.
            self._heartbeat = self._clock()
            try:
                if time.monotonic() >= next_sweep:
                    await self._housekeeping()
                    next_sweep = time.monotonic() + self._sweep_interval_s
                self._room.clear()  # before counting: an item finishing from here on sets it
                # An item whose result is being written holds no slot: the next burst is read
                # while the last one's results are recorded.
                free = self._concurrency - len(self._in_flight) + self._recording
                if free > 0:
                    items = await self._queue.read(self._consumer, count=free, block_ms=500)
                    checked = await self._check_burst(items)
                    for item in items:
                        self._start(item, checked.get(item.batch_id))
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._room.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down or restarting: the loop waits and goes on
                logger.warning("batch worker %s: %s; retrying", self._consumer, exc)
                await asyncio.sleep(1.0)

    def _start(self, item: QueueItem, checked: object = None) -> None:
        task = asyncio.get_running_loop().create_task(self._process(item, checked))
        self._in_flight[task] = item
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._room.set()

    async def _check_burst(self, items: list[QueueItem]) -> dict[str, object]:
        """Each batch of a burst read once (record and tenant): the first try of each of its
        items rests on that read, made after the items were read, so a burst of 64 costs two
        round trips, not 128. Later tries read again, each for itself."""
        checked: dict[str, object] = {}
        for batch_id in dict.fromkeys(item.batch_id for item in items):
            try:
                checked[batch_id] = await self._stop_reason(batch_id)
            except Exception as exc:  # noqa: BLE001 - its items read for themselves (and fail as before)
                logger.info("batch %s: burst check failed (%s); its items check themselves", batch_id, exc)
        return checked

    def _publish_counts(self) -> None:
        for outcome, count in self._recorded.items():
            self._metrics.items.inc(count, tags={"outcome": outcome})
        self._recorded.clear()

    async def _housekeeping(self) -> None:
        self._publish_counts()
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

    async def _process(self, item: QueueItem, checked: object = None) -> None:
        try:
            outcome = await self._run_item(item, checked)
            if outcome is None:  # its batch is gone or already final: nothing to record
                await self._queue.drop(item)
                return
            ok, line = outcome
            self._recording += 1
            self._room.set()
            try:
                new, completed, failed, total = await self._writer.write(
                    item, {"ok": ok, "line": line}, ok=ok
                )
            finally:
                self._recording -= 1
            if new:  # counted here, published by the loop's housekeeping (a metric call per item
                # cost as much as the rest of the item's Python on the queue benchmark)
                self._recorded["completed" if ok else "failed"] += 1
            if completed + failed >= total:
                await self._batches.finalize(item.batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - not acknowledged: reclaimed after its visibility timeout
            logger.warning("batch item %s/%s not recorded: %s", item.batch_id, item.line, exc)

    async def _run_item(self, item: QueueItem, checked: object = None) -> tuple[bool, dict[str, Any]] | None:
        """`checked`: the burst's read of the item's batch, for its first try."""
        item_id = f"{item.batch_id}-{item.line}"
        if item.deliveries > self._max_deliveries:
            self._metrics.items.inc(tags={"outcome": "dead_lettered"})
            failed = item.deliveries - 1
            return False, batch_error_line(
                item_id,
                item.custom_id,
                GenerationFailed(
                    f"not run: handed to a worker {failed} times without a result (limit {self._max_deliveries})",
                    code="max_deliveries_exceeded",
                ),
            )
        attempts = tries = 0
        while True:
            stop = checked if checked is not None else await self._stop_reason(item.batch_id)
            checked = None  # every later try reads again
            if stop is VALIDATING:
                await asyncio.sleep(VALIDATING_POLL_S)
                continue
            if stop is GONE:
                return None
            if isinstance(stop, PhiserveError):
                return False, batch_error_line(item_id, item.custom_id, stop)
            assert isinstance(stop, Tenant)
            try:
                async with self._generating.get(item.pool, contextlib.nullcontext()):
                    body = await self._generate(stop, item, item_id)
                return True, output_line(item_id, item.custom_id, body)
            except WAITS as exc:
                if exc.param in NEVER_FITS:
                    return False, batch_error_line(item_id, item.custom_id, exc)
                tries += 1
                delay = self._delay(tries, exc)
            except RETRYABLE as exc:
                attempts += 1
                if attempts >= self._max_attempts:
                    return False, batch_error_line(item_id, item.custom_id, exc)
                self._metrics.items.inc(tags={"outcome": "retried"})
                tries += 1
                delay = self._delay(tries, exc)
            except PhiserveError as exc:
                return False, batch_error_line(item_id, item.custom_id, exc)
            await asyncio.sleep(delay)

    async def _stop_reason(self, batch_id: str) -> object:
        """Read before every try: the tenant to run the batch's item as, or why not to run it."""
        tenant_id = self._tenant_of.get(batch_id)
        tenant_read: Tenant | BaseException | None = None
        if tenant_id is None:
            record = await self._batches.record(batch_id)
        else:  # a batch's tenant never changes: both reads in one round trip
            record_read, tenant_read = await asyncio.gather(
                self._batches.record(batch_id),
                self._core.tenants.get_tenant(tenant_id),
                return_exceptions=True,
            )
            if isinstance(record_read, BaseException):
                raise record_read
            record = record_read
        status = record.get("status")
        if not record or BatchStatus(status).final:
            return GONE
        if status == BatchStatus.validating.value:  # still being enqueued: not yet ready
            return VALIDATING
        if status == BatchStatus.cancelling.value:
            return InvalidRequest("not run: the batch was cancelled", code="batch_cancelled")
        if record.get("expiring"):
            return InvalidRequest("not run: the batch's completion window ended", code="batch_expired")
        if isinstance(tenant_read, BaseException):
            raise tenant_read
        tenant = tenant_read or await self._core.tenants.get_tenant(record["tenant_id"])
        if len(self._tenant_of) >= 1024:  # bounded; a batch's entry is only a shortcut
            self._tenant_of.clear()
        self._tenant_of[batch_id] = record["tenant_id"]
        if tenant.disabled:
            return PermissionDenied("not run: the tenant is disabled", code="tenant_disabled")
        return tenant.model_copy(update={"priority_class": PriorityClass.batch})

    def _delay(self, tries: int, exc: PhiserveError) -> float:
        """Exponential from `backoff_s`, at least the error's Retry-After, capped; half of it
        jittered so items refused together do not come back together."""
        base = min(self._backoff_s * 2.0 ** (tries - 1), self._max_backoff_s)
        base = max(base, min(float(exc.retry_after_s or 0), self._max_backoff_s))
        return base / 2 + self._jitter() * base / 2

    async def _generate_on_core(self, tenant: Tenant, item: QueueItem, item_id: str) -> dict[str, Any]:
        caller = Caller(tenant=tenant, labels={"model": "none", "tenant": "batch"})
        core = self._core
        try:
            if item.url == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(item.body)
                prepared: tuple[Any, ...] = await core.chat.prepare(
                    chat, item_id, tenant=tenant, response_id=item_id
                )
            else:
                completion = CompletionRequest.model_validate(item.body)
                prepared = await core.completions.prepare(
                    completion, item_id, tenant=tenant, response_id=item_id
                )
        except ValidationError as exc:
            raise invalid_request_from(exc.errors()) from None
        # An `ft:` item's adapter is resolved now, as its tenant's: one deleted since the batch
        # was created fails the item with model_not_found, like a model that does not exist.
        pool, request, shape = prepared
        body, _ = await core.runner.complete(caller, pool, request, shape)
        return dict(body)

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
        self._stopped = True
        self._publish_counts()
        for task in list(self._in_flight):
            task.cancel()
