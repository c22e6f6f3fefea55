"""Throughput of the batch queue path against raw Redis Streams, in the same run.

queue path: enqueue (one Lua call of XADDs per chunk, as BatchService does) -> the real batch
            worker loop (`BatchProcessor.run`: XREADGROUP, the batch and tenant checked
            before the try, a pass-through stand-in for generation, the result written once
            and acknowledged in one Lua step per burst of results, `ResultWriter`), timed until
            the last item's result is recorded (the worker then finalizes the batch)
raw:        the same payloads: pipelined XADD -> XREADGROUP -> one XACK per read

Both use one private redis-server, the same chunk and read size (the worker keeps READ_COUNT
items in flight). With --e2e it also runs a batch through a real cluster on the tiny vLLM text
model and reports items/s end to end (that number is dominated by generation, not the queue).

    .venv/bin/python benchmarks/queue_throughput.py [--items 20000] [--e2e] [--profile FILE]

Ends with: RESULT queue items_per_s=X raw_ratio=Y
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import CACHE_DIR, deploy, free_port, serve_session, text_catalog

from services.batch.api import build_batch_api
from services.batch.metrics import BatchMetrics
from services.batch.queue import BatchQueue, QueueItem, add_items, item_fields
from services.batch.service import BatchService
from services.batch.worker import BatchProcessor
from services.inference.core import Core, build_core
from services.local.redis_server import LocalRedis
from services.redis_store import RedisStore, keys
from services.settings import Settings
from services.tenancy.models import Tenant

READ_COUNT = 64
ENQUEUE_CHUNK = 500  # Settings.batch_enqueue_chunk's default
TENANT = "bench"


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


async def _passthrough(tenant: Tenant, item: QueueItem, item_id: str) -> dict[str, Any]:
    """The engine's stand-in: a chat completion body of the usual size, at once."""
    return {
        "id": item_id,
        "object": "chat.completion",
        "model": item.body["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok " * 8}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }


class Meter:
    """One path's timed section: wall time, this process's CPU and redis-server's CPU (the
    machine is shared: CPU per item is steadier than items/s), optionally a cProfile."""

    def __init__(self, redis_pid: int, profile: Any = None) -> None:
        self._redis = psutil.Process(redis_pid)
        self._profile = profile
        self.wall_s = self.client_cpu_s = self.redis_cpu_s = self.enqueue_s = 0.0

    def _cpu(self) -> tuple[float, float]:
        redis = self._redis.cpu_times()
        return time.process_time(), redis.user + redis.system

    def start(self) -> None:
        self._at = (time.perf_counter(), *self._cpu())
        if self._profile is not None:
            self._profile.enable()

    def enqueued(self) -> None:
        self.enqueue_s = time.perf_counter() - self._at[0]

    def stop(self) -> None:
        if self._profile is not None:
            self._profile.disable()
        client, redis = self._cpu()
        self.wall_s = time.perf_counter() - self._at[0]
        self.client_cpu_s, self.redis_cpu_s = client - self._at[1], redis - self._at[2]


class _Batches(BatchService):
    """The real service; notes when the worker finalizes (its last result is recorded)."""

    finalized: asyncio.Event

    async def finalize(self, batch_id: str) -> None:
        self.finalized.set()
        await super().finalize(batch_id)


async def queue_path(core: Core, settings: Settings, n: int, meter: Meter) -> None:
    state = core.redis
    await state.redis.flushdb()
    await core.tenants.put_tenant(Tenant(id=TENANT))
    files, _ = build_batch_api(core, settings)
    batches = _Batches(state, files, core.router, enqueue_chunk=ENQUEUE_CHUNK)
    batches.finalized = asyncio.Event()
    queue = BatchQueue(state, ["text"], visibility_timeout_s=settings.batch_visibility_timeout_s)
    processor = BatchProcessor.from_settings(
        core, queue, batches, BatchMetrics(), settings, consumer="bench", generate=_passthrough
    )
    batch_id = "batch_bench"
    items = _items(n)
    meter.start()
    record = {"id": batch_id, "tenant_id": TENANT, "status": "validating", "created_at": int(time.time())}
    await state.redis.hset(
        keys.batch_record(batch_id), mapping={**record, "total": n, "completed": 0, "failed": 0}
    )
    for start in range(0, n, ENQUEUE_CHUNK):  # as BatchService.create, chunk by chunk
        await add_items(state, "text", batch_id, items[start : start + ENQUEUE_CHUNK])
    await state.redis.hset(keys.batch_record(batch_id), "status", "in_progress")
    meter.enqueued()
    # The worker starts once the batch is ready, as raw's reader starts after its writes (a
    # worker that read a still-validating batch would wait out its 0.2 s poll).
    worker = asyncio.get_running_loop().create_task(processor.run())
    await asyncio.wait_for(batches.finalized.wait(), timeout=600)
    meter.stop()
    # Let the finalize the worker started finish (untimed), so the next round runs alone.
    deadline = time.monotonic() + 120
    while await state.redis.hget(keys.batch_record(batch_id), "status") != "completed":
        assert time.monotonic() < deadline, "the batch was not finalized"
        await asyncio.sleep(0.05)
    processor.stop()
    worker.cancel()
    await asyncio.wait({worker}, timeout=5)
    counts = await state.redis.hmget(keys.batch_record(batch_id), "completed", "total")
    assert counts == [str(n), str(n)], counts


async def raw_path(state: RedisStore, n: int, meter: Meter) -> None:
    await state.redis.flushdb()
    stream = "raw:stream"
    await state.redis.xgroup_create(stream, "g", id="0", mkstream=True)
    items = _items(n)
    meter.start()
    # Serialising the payloads is part of both paths (an application has to encode them).
    payloads = [item_fields("batch_bench", item) for item in items]
    for start in range(0, n, ENQUEUE_CHUNK):
        async with state.redis.pipeline(transaction=True) as pipe:
            for fields in payloads[start : start + ENQUEUE_CHUNK]:
                pipe.xadd(stream, fields)
            await pipe.execute()
    meter.enqueued()
    done = 0
    while done < n:
        reply = await state.redis.xreadgroup("g", "bench", {stream: ">"}, count=READ_COUNT, block=1000)
        entries = reply[0][1] if reply else []
        if entries:  # the strongest raw baseline: one XACK for the whole read
            await state.redis.xack(stream, "g", *(entry_id for entry_id, _ in entries))
        done += len(entries)
    meter.stop()


async def micro(items: int, rounds: int, profile: str | None) -> dict[str, list[Meter]]:
    """Alternating rounds of both paths (the machine's noise spread over both)."""
    import cProfile

    with tempfile.TemporaryDirectory() as tmp:
        redis = LocalRedis(port=free_port(), directory=Path(tmp))
        redis.start()
        settings = Settings(
            cache_dir=CACHE_DIR,
            redis_url=redis.url,
            files_dir=Path(tmp) / "files",
            batch_concurrency=READ_COUNT,
        )
        core = build_core(settings, text_catalog(), {})
        redis_pid = int(redis.pidfile.read_text())
        profiles = {"raw": cProfile.Profile(), "queue": cProfile.Profile()} if profile else {}
        meters: dict[str, list[Meter]] = {"raw": [], "queue": []}
        try:
            for _ in range(rounds):
                meters["raw"].append(Meter(redis_pid, profiles.get("raw")))
                await raw_path(core.redis, items, meters["raw"][-1])
                meters["queue"].append(Meter(redis_pid, profiles.get("queue")))
                await queue_path(core, settings, items, meters["queue"][-1])
            for name, prof in profiles.items():
                prof.dump_stats(f"{profile}.{name}")
            return meters
        finally:
            await core.close()
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
    parser.add_argument("--profile", help="write the timed sections' cProfiles to FILE.raw, FILE.queue")
    args = parser.parse_args()

    meters = asyncio.run(micro(args.items, args.rounds, args.profile))
    rates = {name: max(args.items / m.wall_s for m in runs) for name, runs in meters.items()}
    print(f"{'path':<42}{'items/s':>10}{'client us/item':>16}{'redis us/item':>15}{'enqueue':>9}")
    for name, label in (
        ("raw", "raw XADD+XREADGROUP+XACK"),
        ("queue", "queue path (enqueue->worker->record+ack)"),
    ):
        client = statistics.median(1e6 * m.client_cpu_s / args.items for m in meters[name])
        server = statistics.median(1e6 * m.redis_cpu_s / args.items for m in meters[name])
        enqueue = statistics.median(m.enqueue_s / m.wall_s for m in meters[name])
        print(f"{label:<42}{rates[name]:>10.0f}{client:>16.1f}{server:>15.1f}{enqueue:>9.0%}")
    queue_rate, raw_rate = rates["queue"], rates["raw"]
    if args.e2e:
        e2e_rate = end_to_end(args.e2e_items)
        print(f"{'end to end, tiny vLLM (8 tokens/item)':<40}{e2e_rate:>12.1f}")
    print(f"RESULT queue items_per_s={queue_rate:.0f} raw_ratio={queue_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
