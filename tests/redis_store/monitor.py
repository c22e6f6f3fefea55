"""Which keys did each Lua script call touch? Read from a real redis-server's MONITOR.

MONITOR shows every command a script runs (as `[db lua]`), right after the EVALSHA that ran
it (Redis runs a script atomically, so nothing else comes between). Which arguments of a
command are keys is Redis's own answer (COMMAND GETKEYS), not a list kept here.
"""

from __future__ import annotations

import asyncio
import codecs
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

_LINE = re.compile(rb"^(?P<time>[\d.]+) \[(?P<db>\d+) (?P<client>[^\]]+)\] (?P<args>.*)$", re.DOTALL)
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
KEYLESS = {b"time"}  # commands the scripts run that name no key
END = "script-keys-monitor-end"


@dataclass
class ScriptCall:
    sha: str
    declared: list[str]  # the KEYS the caller passed
    commands: list[list[bytes]] = field(default_factory=list)  # what the script ran
    touched: set[str] = field(default_factory=set)  # keys of those commands

    @property
    def undeclared(self) -> set[str]:
        return self.touched - set(self.declared)


def _args(raw: bytes) -> list[bytes]:
    # MONITOR quotes each argument with C-style escapes (\" \\ \n \xHH), as Python does.
    return [codecs.escape_decode(arg)[0] for arg in _ARG.findall(raw)]  # type: ignore[misc]


class ScriptMonitor:
    def __init__(self, url: str) -> None:
        self._url = url
        self.calls: list[ScriptCall] = []

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[ScriptMonitor]:
        """Record every script call made inside the block, on any connection."""
        client = aioredis.Redis.from_url(self._url)
        try:
            async with client.monitor() as monitor:
                yield self
                await client.echo(END)
                lines = []
                while True:
                    raw = await monitor.connection.read_response()  # type: ignore[union-attr]
                    assert isinstance(raw, bytes), raw
                    if raw.endswith(f'"{END}"'.encode()):
                        break
                    lines.append(raw)
            await self._attribute(client, lines)
        finally:
            await client.aclose()

    async def _attribute(self, client: aioredis.Redis, lines: list[bytes]) -> None:
        current: ScriptCall | None = None
        for raw in lines:
            match = _LINE.match(raw)
            assert match, raw
            args = _args(match["args"])
            name = args[0].lower()
            if match["client"] == b"lua":
                assert current is not None, f"a script command before any EVALSHA: {raw!r}"
                current.commands.append(args)
                current.touched.update(await _keys_of(client, args))
            elif name in (b"evalsha", b"eval"):
                n = int(args[2])
                current = ScriptCall(args[1].decode(), declared=[key.decode() for key in args[3 : 3 + n]])
                self.calls.append(current)


async def _keys_of(client: aioredis.Redis, args: list[bytes]) -> list[str]:
    if args[0].lower() in KEYLESS:
        return []
    try:
        keys = await client.command_getkeys(*args)
    except ResponseError as exc:
        raise AssertionError(f"Redis cannot name the keys of {args!r}: {exc}") from exc
    return [key.decode() if isinstance(key, bytes) else str(key) for key in keys]


_HOUSEKEEPING = ("PING", "CLIENT", "SELECT", "HELLO")
_COMMANDS_END = "commands-during-end"


async def commands_during(url: str, redis: aioredis.Redis, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """Every command (as MONITOR prints it) Redis ran on `url`'s database while `action` ran,
    connection housekeeping left out. `redis` is the client under test: a marker it sends after
    `action` ends the recording."""
    watcher = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async with watcher.monitor() as monitor:
            await action()
            await redis.echo(_COMMANDS_END)
            seen: list[str] = []
            while True:
                command = (await asyncio.wait_for(monitor.next_command(), 5))["command"]
                if _COMMANDS_END in command:
                    return seen
                if command.split()[0].upper() not in _HOUSEKEEPING:
                    seen.append(command)
    finally:
        await watcher.aclose()
