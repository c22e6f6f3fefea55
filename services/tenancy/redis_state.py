"""The one boundary to Redis: clients, Lua scripts, and error translation.

Every Redis error becomes `ServiceUnavailable` (503, code `tenancy_unavailable`) here,
so auth and admission fail closed; redis-py reconnects on the next command, so the
gateway recovers by itself when Redis returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, RedisError, TimeoutError

from services.errors import ServiceUnavailable

LUA_DIR = Path(__file__).parent / "lua"
SCRIPTS = ("admit", "settle", "fair_queue")

T = TypeVar("T")


class TenancyUnavailable(ServiceUnavailable):
    default_code = "tenancy_unavailable"


class RedisState:
    def __init__(self, url: str, *, socket_timeout_s: float = 5.0, max_connections: int = 1024) -> None:
        common: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": 2.0,
            "max_connections": max_connections,
            "health_check_interval": 10,
            # A pooled connection to a Redis that restarted fails once, and a Redis
            # loading its AOF answers LOADING: reconnect and retry briefly before a 503.
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            "retry_on_error": [BusyLoadingError, ConnectionError, TimeoutError],
        }
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=socket_timeout_s, **common)
        # BLPOP holds its connection for the whole wait: no socket timeout there.
        self.blocking: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=None, **common)
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

    async def blpop(self, key: str, timeout_s: float) -> Any:
        return await self.run(self.blocking.blpop([key], timeout=timeout_s))

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
