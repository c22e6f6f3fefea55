"""The one boundary to Redis: clients, Lua scripts, and error translation.

Every Redis error becomes `ServiceUnavailable` (503, code `tenancy_unavailable`) here,
so auth and admission fail closed; redis-py reconnects on the next command, so the
gateway recovers by itself when Redis returns.

No call waits forever on a Redis that stopped answering (a half-open connection, a paused
server; issue 9, item 7): ordinary commands have a socket timeout, blocking ones (BLPOP,
XREADGROUP ... BLOCK) are bounded by their block time plus a margin, and every connection
has TCP keepalive so a dead peer is noticed even between commands.
"""

from __future__ import annotations

import asyncio
import builtins
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, RedisError, TimeoutError

# TenancyUnavailable lives in the drawn tree (services/errors.py); raised from here only.
from services.errors import TenancyUnavailable

LUA_DIR = Path(__file__).parent / "lua"
SCRIPTS = ("admit", "settle", "fair_queue", "renew_leases")

T = TypeVar("T")

# Probe an idle connection after 10 s, every 5 s, give up after 3 misses: ~25 s to notice.
KEEPALIVE_OPTIONS = {
    option: value
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, option)
}


class RedisState:
    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float | None = 5.0,
        max_connections: int = 1024,
        blocking_margin_s: float = 2.0,
        max_block_s: float = 120.0,
    ) -> None:
        self._blocking_margin_s = blocking_margin_s
        common: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": 2.0,
            "socket_keepalive": True,
            "socket_keepalive_options": {
                getattr(socket, name): value for name, value in KEEPALIVE_OPTIONS.items()
            },
            "max_connections": max_connections,
            "health_check_interval": 10,
            # A pooled connection to a Redis that restarted fails once, and a Redis
            # loading its AOF answers LOADING: reconnect and retry briefly before a 503.
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            "retry_on_error": [BusyLoadingError, ConnectionError, TimeoutError],
        }
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=socket_timeout_s, **common)
        # Blocking commands hold their connection for the whole wait: each call is bounded by
        # `blocking_call`; the socket timeout is only a backstop above the longest block. A
        # timed-out blocking read is not retried (that would multiply the bound).
        blocking = dict(common, retry_on_error=[BusyLoadingError, ConnectionError])
        self.blocking: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=max_block_s + blocking_margin_s, **blocking
        )
        self._scripts = {
            name: self.redis.register_script((LUA_DIR / f"{name}.lua").read_text()) for name in SCRIPTS
        }

    async def run(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except RedisError as exc:
            raise TenancyUnavailable(
                "tenant state is unavailable (Redis); retry shortly", retry_after_s=2
            ) from exc

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.run(self._scripts[name](keys=keys, args=args))

    async def blocking_call(self, awaitable: Awaitable[T], *, block_s: float) -> T:
        """A blocking command on `self.blocking`, answered within `block_s` + the margin or
        refused with a 503 (cancelling it drops its connection: redis-py disconnects)."""
        try:
            return await self.run(asyncio.wait_for(awaitable, block_s + self._blocking_margin_s))
        except builtins.TimeoutError:
            raise TenancyUnavailable(
                f"Redis did not answer within {block_s + self._blocking_margin_s:.1f} s; retry shortly",
                retry_after_s=2,
            ) from None

    async def blpop(self, key: str, timeout_s: float) -> Any:
        return await self.blocking_call(self.blocking.blpop([key], timeout=timeout_s), block_s=timeout_s)

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[Any]:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                yield pipe
        except RedisError as exc:
            raise TenancyUnavailable(
                "tenant state is unavailable (Redis); retry shortly", retry_after_s=2
            ) from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()
