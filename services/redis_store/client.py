"""The Redis boundary: connection setup, script registration and error translation, once.

Every Redis error becomes `TenancyUnavailable` (503, code `tenancy_unavailable`) inside
the client itself (`_TranslatingRedis.execute_command` and its pipeline's `execute`), so
a caller writes `await store.redis.get(key)` and never wraps a call; auth and admission
then fail closed, and redis-py reconnects on the next command, so the gateway recovers by
itself when Redis returns. The two replies some callers expect (a consumer group that
exists already, or that Redis lost) are typed outcomes of `create_group` and `read_group`.

No call waits forever on a Redis that stopped answering (a half-open connection, a paused
server; issue 9, item 7): ordinary commands have a socket timeout, blocking ones (BLPOP,
XREADGROUP ... BLOCK) are bounded by their block time plus a margin, and every connection
has TCP keepalive so a dead peer is noticed even between commands.
"""

from __future__ import annotations

import asyncio
import builtins
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.typing import EncodableT, StreamIdT

from services.errors import TenancyUnavailable
from services.redis_store.scripts import Script

# Probe an idle connection after 10 s, every 5 s, give up after 3 misses: ~25 s to notice.
KEEPALIVE_OPTIONS = {
    option: value
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, option)
}

UNAVAILABLE = "tenant state is unavailable (Redis); retry shortly"


def _unavailable(exc: RedisError) -> NoReturn:
    """The one translation of a redis-py error (the cause stays attached for the logs)."""
    raise TenancyUnavailable(UNAVAILABLE, retry_after_s=2) from exc


def _reply_code(exc: BaseException) -> str | None:
    """The error code of a Redis error reply ("BUSYGROUP", "NOGROUP", ...) behind a
    translated error; redis-py has no class of its own for these replies."""
    cause = exc.__cause__
    if isinstance(cause, ResponseError) and str(cause):
        return str(cause).split(" ", 1)[0]
    return None


# What redis-py's hset(mapping=), xadd and xclaim take: its annotations are a dict and a list,
# invariant in their items, so a dict[str, str] or list[str] is declared as one of these to pass.
EntryFields = dict[EncodableT, EncodableT]
EntryIds = list[StreamIdT]


# Both clients decode every reply (decode_responses=True), which redis-py's annotations
# (bytes | str whatever the client) cannot say: these name the replies' real types for the
# type checker, at no cost at run time.
def text(reply: bytes | str) -> str:
    return cast(str, reply)


def texts(replies: list[Any]) -> list[str]:
    return cast(list[str], replies)


def text_set(replies: set[bytes | str]) -> set[str]:
    return cast(set[str], replies)


def text_hash(reply: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return cast(dict[str, str], reply)


class _TranslatingPipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error)
        except RedisError as exc:
            _unavailable(exc)


class _TranslatingRedis(aioredis.Redis):
    """redis-py's client whose every command (and pipeline) raises `TenancyUnavailable`
    instead of a redis-py error."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            # redis-py leaves execute_command unannotated.
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except NoScriptError:
            raise  # redis-py's script object loads the script and retries on this one
        except RedisError as exc:
            _unavailable(exc)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> _TranslatingPipeline:
        return _TranslatingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class GroupCreation(Enum):
    CREATED = "created"
    EXISTED = "existed"  # Redis answered BUSYGROUP


StreamEntries = list[tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class GroupRead:
    """What XREADGROUP gave: entries per stream, or `group_missing` when Redis lost the
    consumer group (a restart without AOF)."""

    streams: list[tuple[str, StreamEntries]]
    group_missing: bool = False


class RedisStore:
    """The process's Redis clients: `redis` for ordinary commands and pipelines, and a
    second pool for blocking reads (`blpop`, `read_group`), which hold their connection
    for the whole wait."""

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
        self.redis: aioredis.Redis = _TranslatingRedis.from_url(
            url, socket_timeout=socket_timeout_s, **common
        )
        # Blocking commands hold their connection for the whole wait: each call is bounded by
        # `_bounded`; the socket timeout is only a backstop above the longest block. A
        # timed-out blocking read is not retried (that would multiply the bound).
        blocking = dict(common, retry_on_error=[BusyLoadingError, ConnectionError])
        self.blocking: aioredis.Redis = _TranslatingRedis.from_url(
            url, socket_timeout=max_block_s + blocking_margin_s, **blocking
        )
        # Every script, registered once (redis-py loads it on first use and on NOSCRIPT).
        self._scripts = {script: self.redis.register_script(script.source()) for script in Script}

    async def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._scripts[script](keys=list(keys), args=list(args))

    def script_sha(self, script: Script) -> str:
        return str(self._scripts[script].sha)

    def pipeline(self, *, transaction: bool = True) -> Pipeline:
        """A pipeline (MULTI/EXEC by default) whose `execute` translates errors; use it as
        `async with store.pipeline() as pipe:`."""
        return self.redis.pipeline(transaction=transaction)

    async def _bounded(self, awaitable: Any, *, block_s: float) -> Any:
        """A blocking command answered within `block_s` + the margin or refused with a 503
        (cancelling it drops its connection: redis-py disconnects)."""
        limit_s = block_s + self._blocking_margin_s
        try:
            return await asyncio.wait_for(awaitable, limit_s)
        except builtins.TimeoutError:
            raise TenancyUnavailable(
                f"Redis did not answer within {limit_s:.1f} s; retry shortly", retry_after_s=2
            ) from None

    async def blpop(self, key: str, timeout_s: float) -> Any:
        return await self._bounded(self.blocking.blpop([key], timeout=timeout_s), block_s=timeout_s)

    async def create_group(self, stream: str, group: str) -> GroupCreation:
        """Create a consumer group reading `stream` from its start (and the stream)."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except TenancyUnavailable as exc:
            if _reply_code(exc) == "BUSYGROUP":
                return GroupCreation.EXISTED
            raise
        return GroupCreation.CREATED

    async def read_group(
        self, group: str, consumer: str, streams: dict[str, str], *, count: int, block_ms: int
    ) -> GroupRead:
        """XREADGROUP ... BLOCK on the blocking pool, bounded like `blpop`."""
        try:
            reply = await self._bounded(
                self.blocking.xreadgroup(group, consumer, streams, count=count, block=block_ms),  # type: ignore[arg-type]
                block_s=block_ms / 1000,
            )
        except TenancyUnavailable as exc:
            if _reply_code(exc) == "NOGROUP":
                return GroupRead([], group_missing=True)
            raise
        return GroupRead(list(reply or []))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except TenancyUnavailable:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()
