"""Throughput of the batch queue path against raw Redis Streams, in the same run.

queue path: enqueue (MULTI of XADDs, as BatchService.create) -> XREADGROUP (BatchQueue.read)
            -> pass-through engine stand-in -> result written + acknowledged in one Lua step
            per item (HSETNX result, HINCRBY count, XACK, XDEL), results finishing within 2 ms
            coalesced into one call (ResultWriter, as the worker does)
raw:        the same payloads: pipelined XADD -> XREADGROUP -> one XACK per read

Both use one private redis-server, the same read size and the same per-item concurrency.
With --e2e it also runs a batch through a real cluster on the tiny vLLM text model and
reports items/s end to end (that number is dominated by generation, not by the queue).

    .venv/bin/python benchmarks/queue_throughput.py [--items 20000] [--e2e]

Ends with: RESULT queue items_per_s=X raw_ratio=Y
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import CACHE_DIR, deploy, free_port, serve_session, text_catalog

from services.batch.queue import BatchQueue, ResultWriter, item_fields
from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore, keys

READ_COUNT = 64
ENQUEUE_CHUNK = 1000


def _items(n: int) -> list[dict]:  # type: ignore[type-arg]
    body = {
        "model": "phi-3.5-mini",
        "messages": [{"role": "user", "content": "Summarise the report."}],
        "max_tokens": 32,
    }
    return [
        {"line": i + 1, "custom_id": f"req-{i}", "url": "/v1/chat/completions", "body": body}
        for i in range(n)
    ]


async def queue_path(state: RedisStore, n: int) -> float:
    await state.redis.flushdb()
    queue = BatchQueue(state, ["text"], visibility_timeout_s=60)
    writer = ResultWriter(queue)  # what the worker records through
    await queue.ensure_groups()
    batch_id = "batch_bench"
    items = _items(n)
    started = time.perf_counter()
    await state.redis.hset(keys.batch_record(batch_id), mapping={"total": n, "completed": 0, "failed": 0})
    for start in range(0, n, ENQUEUE_CHUNK):
        async with state.redis.pipeline(transaction=True) as pipe:
            for item in items[start : start + ENQUEUE_CHUNK]:
                pipe.xadd(keys.batch_stream("text"), item_fields(batch_id, item))
            await pipe.execute()
    done = 0
    while done < n:
        batch = await queue.read("bench", count=READ_COUNT, block_ms=1000)

        async def process(item):  # type: ignore[no-untyped-def]
            result = {
                "ok": True,
                "line": {"custom_id": item.custom_id, "response": {"status_code": 200, "body": item.body}},
            }
            await writer.write(item, result, ok=True)

        await asyncio.gather(*(process(item) for item in batch))
        done += len(batch)
    elapsed = time.perf_counter() - started
    counts = await state.redis.hmget(keys.batch_record(batch_id), "completed", "total")
    assert counts == [str(n), str(n)], counts
    return n / elapsed


async def raw_path(state: RedisStore, n: int) -> float:
    await state.redis.flushdb()
    stream = "raw:stream"
    await state.redis.xgroup_create(stream, "g", id="0", mkstream=True)
    items = _items(n)
    started = time.perf_counter()
    # Serialising the payloads is part of both paths (an application has to encode them).
    payloads = [item_fields("batch_bench", item) for item in items]
    for start in range(0, n, ENQUEUE_CHUNK):
        async with state.redis.pipeline(transaction=True) as pipe:
            for fields in payloads[start : start + ENQUEUE_CHUNK]:
                pipe.xadd(stream, fields)
            await pipe.execute()
    done = 0
    while done < n:
        reply = await state.redis.xreadgroup("g", "bench", {stream: ">"}, count=READ_COUNT, block=1000)
        entries = reply[0][1] if reply else []
        if entries:  # the strongest raw baseline: one XACK for the whole read
            await state.redis.xack(stream, "g", *(entry_id for entry_id, _ in entries))
        done += len(entries)
    return n / (time.perf_counter() - started)


async def micro(items: int, rounds: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        redis = LocalRedis(port=free_port(), directory=Path(tmp))
        redis.start()
        state = RedisStore(redis.url)
        try:
            queue_rates, raw_rates = [], []
            for _ in range(rounds):  # alternate to spread the machine's noise over both
                raw_rates.append(await raw_path(state, items))
                queue_rates.append(await queue_path(state, items))
            return max(queue_rates), max(raw_rates)
        finally:
            await state.close()
            redis.stop()


def end_to_end(items: int) -> float:
    """A real cluster (text pool only), a real batch of `items` 8-token requests."""
    from openai import OpenAI
    from pydantic import SecretStr

    from services.local.tiny_models import build_tiny_models
    from services.settings import Settings

    cache = CACHE_DIR
    build_tiny_models(cache / "models")
    tmp = Path(tempfile.mkdtemp())
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start()
    port = free_port()
    key = "psk-bench000-queue-benchmark-key"
    settings = Settings(
        port=port,
        grpc_port=None,
        cache_dir=cache,
        redis_url=redis.url,
        api_key=SecretStr(key),
        admin_key=SecretStr("bench-admin-key-0123456789"),
        files_dir=tmp / "files",
        batch_concurrency=32,
    )
    try:
        with serve_session(port):
            base = deploy(settings, text_catalog())
            return _run_batch(OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0), items)
    finally:
        redis.stop()


def _run_batch(client: Any, items: int) -> float:
    """A batch of `items` 8-token chats through the running cluster; items per second."""
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "phi-3.5-mini",
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    "max_tokens": 8,
                    "ignore_eos": True,
                },
            }
        )
        for i in range(items)
    ]
    upload = client.files.create(file=("b.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while (batch := client.batches.retrieve(batch.id)).status not in (
        "completed",
        "failed",
        "cancelled",
        "expired",
    ):
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    assert batch.status == "completed" and batch.request_counts.completed == items, batch
    return items / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000, help="items per measured round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best of)")
    parser.add_argument("--e2e", action="store_true", help="also run a batch through a real cluster")
    parser.add_argument("--e2e-items", type=int, default=200)
    args = parser.parse_args()

    queue_rate, raw_rate = asyncio.run(micro(args.items, args.rounds))
    print(f"{'path':<40}{'items/s':>12}")
    print(f"{'raw XADD+XREADGROUP+XACK':<40}{raw_rate:>12.0f}")
    print(f"{'queue path (enqueue->read->record+ack)':<40}{queue_rate:>12.0f}")
    if args.e2e:
        e2e_rate = end_to_end(args.e2e_items)
        print(f"{'end to end, tiny vLLM (8 tokens/item)':<40}{e2e_rate:>12.1f}")
    print(f"RESULT queue items_per_s={queue_rate:.0f} raw_ratio={queue_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
