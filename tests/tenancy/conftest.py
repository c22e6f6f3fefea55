"""Tenancy unit tests run against the session's real redis-server, on their own DB."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.tenancy.local_redis import LocalRedis
from services.tenancy.redis_state import RedisState

UNIT_DB = 3


@pytest.fixture
async def state(redis_server: LocalRedis) -> AsyncIterator[RedisState]:
    st = RedisState(f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}")
    await st.redis.flushdb()
    try:
        yield st
    finally:
        await st.redis.flushdb()
        await st.close()
