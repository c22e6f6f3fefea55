"""A Redis that stops answering (half-open connection, paused server) must not hang the
callers of blocking commands: BLPOP (fair queue) and XREADGROUP (batch queue) return an
error within their block time plus a margin, and every connection has TCP keepalive
(issue 9, item 7). A private redis-server is SIGSTOPped: the sockets stay open, nothing
answers, exactly what a half-open connection looks like to the client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from services.batch.queue import BatchQueue
from services.errors import TenancyUnavailable
from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore

MARGIN_S = 1.0
HANG_GUARD_S = 10.0  # the test's own bound: today's code would wait forever


async def _bounded(awaitable: object) -> float:
    started = time.monotonic()
    with pytest.raises(TenancyUnavailable):
        await asyncio.wait_for(awaitable, HANG_GUARD_S)  # type: ignore[arg-type]
    return time.monotonic() - started


async def test_blpop_errors_within_its_block_time_when_redis_hangs(
    pausable_redis: tuple[LocalRedis, int],
) -> None:
    server, pid = pausable_redis
    state = RedisStore(server.url, blocking_margin_s=MARGIN_S)
    try:
        assert await state.blpop("k", 0.2) is None  # connected and working
        os.kill(pid, signal.SIGSTOP)
        elapsed = await _bounded(state.blpop("k", 1.0))
        assert elapsed < 1.0 + MARGIN_S + 1.5, elapsed
    finally:
        os.kill(pid, signal.SIGCONT)
        await state.close()


async def test_xreadgroup_errors_within_its_block_time_when_redis_hangs(
    pausable_redis: tuple[LocalRedis, int],
) -> None:
    server, pid = pausable_redis
    state = RedisStore(server.url, blocking_margin_s=MARGIN_S)
    queue = BatchQueue(state, ["p"], visibility_timeout_s=60)
    try:
        await queue.ensure_groups()
        assert await queue.read("w", count=1, block_ms=100) == []
        os.kill(pid, signal.SIGSTOP)
        elapsed = await _bounded(queue.read("w", count=1, block_ms=500))
        assert elapsed < 0.5 + MARGIN_S + 1.5, elapsed
    finally:
        os.kill(pid, signal.SIGCONT)
        await state.close()


async def test_every_redis_connection_has_tcp_keepalive(pausable_redis: tuple[LocalRedis, int]) -> None:
    server, _ = pausable_redis
    state = RedisStore(server.url)
    try:
        for client in (state.redis, state.blocking):
            connection = await client.connection_pool.get_connection()
            try:
                sock = connection._writer.get_extra_info("socket")  # type: ignore[union-attr]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 30
            finally:
                await client.connection_pool.release(connection)
    finally:
        await state.close()
