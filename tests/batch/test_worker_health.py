"""The batch worker's health check fails when its loop is stuck (issue 9, item 7): the loop
beats a heartbeat each turn; a replica whose loop stopped turning (here: its Redis stopped
answering mid-call) reports unhealthy within the deadline, so Serve replaces it, and
healthy again once the loop turns."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from services.local.redis_server import LocalRedis
from tests.batch.harness import build_worker, running, worker_settings

STALL_S = 2.0


async def _health(worker, timeout_s: float, *, healthy: bool) -> float:  # type: ignore[no-untyped-def]
    import asyncio

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            await worker.check_health()
            ok = True
        except RuntimeError:
            ok = False
        if ok is healthy:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health stayed {not healthy} for {timeout_s} s")


async def test_health_fails_while_the_loop_is_stuck(
    pausable_redis: tuple[LocalRedis, int], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import asyncio

    server, pid = pausable_redis
    worker = build_worker(worker_settings(server.url, tmp_path / "files", batch_loop_stall_s=STALL_S))
    async with running(worker):
        # A turning loop stays healthy.
        for _ in range(15):
            await worker.processor.check_health()
            await asyncio.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)
        await _health(worker.processor, STALL_S + 8, healthy=False)
        os.kill(pid, signal.SIGCONT)
        await _health(worker.processor, 30, healthy=True)
