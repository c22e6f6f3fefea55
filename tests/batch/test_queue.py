"""The stream queue on real Redis: results once, redelivery, reclaim of a dead consumer."""

from __future__ import annotations

import asyncio
import json

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
    assert set(results) == {"1", "2"} and json.loads(results["1"])["n"] == 1
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


async def test_one_call_records_several_batches_once_each(state: RedisStore) -> None:
    """record_result.lua groups a burst by batch: each batch's new results are written once,
    its counts bumped by its own new ones, a redelivered item only acknowledged, and a
    finished batch's late result neither stored nor counted."""
    queue = BatchQueue(state, ["p"], visibility_timeout_s=60)
    await queue.ensure_groups()
    await _enqueue(state, "a", 3)
    await _enqueue(state, "b", 2)
    await _enqueue(state, "done", 1)
    await state.redis.hset(keys.batch_record("done"), "status", "completed")
    items = await queue.read("w1", count=10, block_ms=100)
    by = {(i.batch_id, i.line): i for i in items}
    assert await queue.record(by["a", 2], {"n": "first"}, ok=True) == (True, 1, 0, 3)
    answers = await queue.record_many(
        [
            (by["a", 1], {"n": "a1"}, True),
            (by["b", 1], {"n": "b1"}, False),
            (by["a", 2], {"n": "again"}, True),  # recorded above: not written twice
            (by["done", 1], {"n": "late"}, True),
            (by["a", 3], {"n": "a3"}, False),
            (by["b", 2], {"n": "b2"}, True),
        ]
    )
    assert answers == [
        (True, 2, 1, 3),
        (True, 1, 1, 2),
        (False, 2, 1, 3),
        (False, 0, 0, 1),
        (True, 2, 1, 3),
        (True, 1, 1, 2),
    ]
    a_results = await state.redis.hgetall(keys.batch_results("a"))
    assert {line: json.loads(v)["n"] for line, v in a_results.items()} == {"1": "a1", "2": "first", "3": "a3"}
    assert await state.redis.exists(keys.batch_results("done")) == 0
    assert await queue.depth("p") == (0, 0)  # every entry acknowledged and deleted


async def test_items_keep_values_json_reads_but_orjson_would_change(state: RedisStore) -> None:
    """NaN and Infinity (which the batch file's parser accepts) and integers past 64 bits
    reach the worker as they were written."""
    from services.batch.files import validate_batch_jsonl
    from services.batch.queue import add_items

    queue = BatchQueue(state, ["p"], visibility_timeout_s=60)
    await queue.ensure_groups()
    line = (
        '{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": '
        '{"model": "m", "temperature": NaN, "top_p": -Infinity, "seed": 123456789012345678901234567890}}'
    )
    items = validate_batch_jsonl((line + "\n" + line.replace('"c"', '"d"')).encode(), max_lines=10)
    items[1]["body"].pop("temperature")  # no NaN left: orjson, whose bigint refusal falls back
    items[1]["body"].pop("top_p")
    await add_items(state, "p", "b", items)
    first, second = await queue.read("w", count=10, block_ms=100)
    assert first.body["temperature"] != first.body["temperature"]  # NaN
    assert first.body["top_p"] == float("-inf")
    assert first.body["seed"] == second.body["seed"] == 123456789012345678901234567890
