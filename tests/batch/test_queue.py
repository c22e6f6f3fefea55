"""The stream queue on real Redis: results once, redelivery, reclaim of a dead consumer."""

from __future__ import annotations

import asyncio

from services.batch.queue import BatchQueue, item_fields
from services.redis_store import RedisStore, keys


async def _enqueue(state: RedisStore, batch_id: str, n: int) -> None:
    await state.redis.hset(
        keys.batch_record(batch_id),
        mapping={"status": "in_progress", "total": n, "completed": 0, "failed": 0},
    )
    for i in range(1, n + 1):
        item = {
            "line": i,
            "custom_id": f"c{i}",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "x"},
        }
        await state.redis.xadd(keys.batch_stream("p"), item_fields(batch_id, item))


async def test_result_recorded_once_even_when_redelivered(state: RedisStore) -> None:
    queue = BatchQueue(state, ["p"], visibility_timeout_s=60)
    await queue.ensure_groups()
    await _enqueue(state, "b1", 2)
    items = await queue.read("w1", count=10, block_ms=100)
    assert [i.custom_id for i in items] == ["c1", "c2"]
    first = await queue.record(items[0], {"ok": True, "n": 1}, ok=True)
    assert first == (True, 1, 0, 2)
    # The same item again (its worker died after writing, before the ack was seen).
    again = await queue.record(items[0], {"ok": True, "n": 2}, ok=True)
    assert again == (False, 1, 0, 2)
    await queue.record(items[1], {"ok": False}, ok=False)
    results = await state.redis.hgetall(keys.batch_results("b1"))
    assert set(results) == {"1", "2"} and '"n": 1' in results["1"]
    assert await queue.depth("p") == (0, 0)  # acknowledged and deleted


async def test_dead_consumers_items_are_reclaimed(state: RedisStore) -> None:
    queue = BatchQueue(state, ["p"], visibility_timeout_s=0.3)
    await queue.ensure_groups()
    await _enqueue(state, "b2", 3)
    taken = await queue.read("dead-worker", count=3, block_ms=100)
    assert len(taken) == 3
    assert await queue.reclaim("live-worker", count=10) == []  # not idle long enough yet
    await asyncio.sleep(0.4)
    reclaimed = await queue.reclaim("live-worker", count=10)
    assert sorted(i.line for i in reclaimed) == [1, 2, 3]


async def test_touch_keeps_a_live_workers_items(state: RedisStore) -> None:
    queue = BatchQueue(state, ["p"], visibility_timeout_s=0.4)
    await queue.ensure_groups()
    await _enqueue(state, "b3", 1)
    taken = await queue.read("busy-worker", count=1, block_ms=100)
    for _ in range(3):
        await asyncio.sleep(0.2)
        await queue.touch("busy-worker", taken)
    assert await queue.reclaim("other", count=10) == []
