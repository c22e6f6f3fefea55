"""Readiness: every pool (and the batch workers) answers a round trip, cached briefly.

`/ready` is unauthenticated (probes carry no key) and each answer costs a call to every
pool replica, which takes a slot of its `max_ongoing_requests`. Cached for `ttl_s`, and
with concurrent callers sharing one probe in flight, a flood of `/ready` calls reaches
each pool at most once per `ttl_s` per gateway replica (issue 9, item 9).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.catalog.models import PoolConfig
from services.inference.ports import PoolHandle
from services.inference.router import PoolRouter

BATCH_WORKERS = "batch-workers"


@dataclass(frozen=True)
class ReadyAnswer:
    ready: bool
    parts: dict[str, str]  # pool name (or "batch-workers") -> "ready" | "unavailable"


class Readiness:
    def __init__(
        self,
        router: PoolRouter,
        pools: list[PoolConfig],
        *,
        batch_worker: PoolHandle | None = None,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._pools = pools
        self._batch_worker = batch_worker
        self._ttl_s = ttl_s
        self._clock = clock
        self._answer: ReadyAnswer | None = None
        self._answered_at = 0.0
        self._probe: asyncio.Future[ReadyAnswer] | None = None

    async def check(self) -> ReadyAnswer:
        if self._answer is not None and self._clock() - self._answered_at < self._ttl_s:
            return self._answer
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._round_trip())
            self._probe.add_done_callback(self._remember)
        # Shielded: one caller that leaves does not cancel the probe the others wait for.
        return await asyncio.shield(self._probe)

    def _remember(self, probe: asyncio.Future[ReadyAnswer]) -> None:
        self._probe = None
        if not probe.cancelled() and probe.exception() is None:
            self._answer = probe.result()
            self._answered_at = self._clock()

    async def _round_trip(self) -> ReadyAnswer:
        answers = list(await asyncio.gather(*(self._router.ready(pool) for pool in self._pools)))
        parts = {
            pool.name: ("ready" if ok else "unavailable")
            for pool, ok in zip(self._pools, answers, strict=True)
        }
        if self._batch_worker is not None:
            batch_ok = await self._router.ready_handle(self._batch_worker)
            answers.append(batch_ok)
            parts[BATCH_WORKERS] = "ready" if batch_ok else "unavailable"
        return ReadyAnswer(all(answers), parts)
