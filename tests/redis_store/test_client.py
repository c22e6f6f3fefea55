"""The Redis boundary on a real redis-server: every redis-py error is translated once, in
the client, and the replies callers expect come back as typed outcomes."""

from __future__ import annotations

import pytest

from services import redis_store
from services.errors import ServiceUnavailable, TenancyUnavailable
from services.redis_store import GroupCreation, RedisStore, Script, keys
from services.tenancy.fair_queue import FairQueue


async def test_a_redis_that_is_gone_is_tenancy_unavailable_on_every_path() -> None:
    dead = RedisStore("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(TenancyUnavailable) as info:
            await dead.redis.get("k")
        assert info.value.code == "tenancy_unavailable" and info.value.retry_after_s == 2
        assert isinstance(info.value, ServiceUnavailable)
        with pytest.raises(TenancyUnavailable):
            async with dead.pipeline() as pipe:
                pipe.get("k")
                await pipe.execute()
        with pytest.raises(TenancyUnavailable):
            await dead.script(Script.RESERVE, keys=["q"], args=["m", 1, 1, 1])
        with pytest.raises(TenancyUnavailable):
            await dead.blpop("k", 0.1)
        assert await dead.ping() is False
    finally:
        await dead.close()


async def test_an_error_reply_is_translated_too(state: RedisStore) -> None:
    await state.redis.set("a-string", "1")
    with pytest.raises(TenancyUnavailable) as info:
        await state.redis.hget("a-string", "f")  # WRONGTYPE
    assert "WRONGTYPE" in str(info.value.__cause__)


async def test_creating_a_group_twice_says_it_existed(state: RedisStore) -> None:
    stream = keys.batch_stream("p")
    assert await state.create_group(stream, keys.BATCH_GROUP) is GroupCreation.CREATED
    assert await state.create_group(stream, keys.BATCH_GROUP) is GroupCreation.EXISTED
    assert await state.redis.exists(stream) == 1  # MKSTREAM


async def test_reading_a_group_redis_lost_says_so(state: RedisStore) -> None:
    stream = keys.batch_stream("p")
    await state.redis.xadd(stream, {"item": "{}"})
    lost = await state.read_group(keys.BATCH_GROUP, "w", {stream: ">"}, count=1, block_ms=10)
    assert lost.group_missing and lost.streams == []
    await state.create_group(stream, keys.BATCH_GROUP)
    read = await state.read_group(keys.BATCH_GROUP, "w", {stream: ">"}, count=1, block_ms=10)
    assert not read.group_missing
    [(name, [(_, fields)])] = read.streams
    assert name == stream and fields == {"item": "{}"}


async def test_scripts_survive_a_script_cache_flush(state: RedisStore) -> None:
    """redis-py reloads a script on NOSCRIPT (a Redis that restarted): that reply must
    reach it untranslated."""
    fq = FairQueue(state, {"p": 1}, max_waiting=10, lease_ttl_s=30)
    grant = await fq.acquire("p", tenant_id="a", cost=1, weight=1, priority=1, timeout_s=1)
    await state.redis.script_flush()
    await fq.release(grant)
    assert await fq.depth("p") == (0, 0)


def test_the_public_surface() -> None:
    assert sorted(redis_store.__all__) == [
        "EntryFields",
        "EntryIds",
        "GroupCreation",
        "GroupRead",
        "RedisStore",
        "Script",
        "StreamEntries",
        "keys",
        "text",
        "text_hash",
        "text_set",
        "texts",
    ]


async def test_replies_are_text_as_the_typing_helpers_say(state: RedisStore) -> None:
    """`text`, `texts`, `text_set` and `text_hash` only tell mypy what the replies are (both
    clients decode): a client that returned bytes would make them lie."""
    await state.redis.set("s", "v")
    await state.redis.sadd("set", "m")
    await state.redis.zadd("z", {"m": 1})
    await state.redis.hset("h", mapping={"f": "v"})
    values = [
        redis_store.text(await state.redis.get("s") or ""),
        *redis_store.text_set(await state.redis.smembers("set")),
        *redis_store.texts(await state.redis.zrevrange("z", 0, -1)),
        *next(iter(redis_store.text_hash(await state.redis.hgetall("h")).items())),
    ]
    await state.redis.rpush("l", "x")
    values.extend(await state.blpop("l", 1))  # the blocking client
    assert values == ["v", "m", "m", "f", "v", "l", "x"] and all(isinstance(v, str) for v in values)
