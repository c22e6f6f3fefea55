"""The batch worker under pressure (issue 9, item 8), on real Redis with the real gate, fair
queue and admission: a pool kept full by another tenant refuses every try with Overloaded.

* tries are spaced by a backoff (they used to spin, each one an admitted request on the
  tenant's RPM window);
* a batch cancelled or expired, or a tenant disabled, while its items wait stops them;
* an item handed out N times without a result is dead-lettered into the error file, once.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from services.batch.queue import BatchQueue
from services.inference.protocol.batches import BatchObject, CreateBatchRequest
from services.redis_store import keys
from tests.batch.harness import Worker, add_tenant, build_worker, full_pool, jsonl, running, worker_settings
from tests.conftest import UNIT_DB

TENANT = "pressed"


def _settings(redis_server, tmp_path: Path, **overrides):  # type: ignore[no-untyped-def]
    url = f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}"
    return worker_settings(url, tmp_path / "files", **overrides)


async def _batch(worker: Worker, n: int = 1) -> BatchObject:
    await add_tenant(worker, TENANT)
    upload = await worker.files.upload(TENANT, filename="in.jsonl", purpose="batch", data=jsonl(n))
    return await worker.batches.create(
        TENANT, CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions")
    )


async def _attempts(worker: Worker) -> int:
    """Every try the gate admits is a request in the tenant's RPM window."""
    window = await worker.state.redis.hgetall(keys.requests_window(TENANT))
    return sum(int(v) for v in window.values())


async def _until(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


async def _error_lines(worker: Worker, batch_id: str) -> list[dict]:  # type: ignore[type-arg]
    batch = await worker.batches.get(TENANT, batch_id)
    assert batch.error_file_id, batch
    data = await worker.files.content(TENANT, batch.error_file_id)
    return [json.loads(line) for line in data.decode().split("\n") if line]


@pytest.fixture
async def clean_db(state):  # type: ignore[no-untyped-def]
    yield state


async def test_overloaded_tries_are_spaced(clean_db, redis_server, tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    worker = build_worker(
        _settings(redis_server, tmp_path, batch_retry_backoff_s=0.3, batch_retry_max_backoff_s=1.0)
    )
    async with full_pool(worker), running(worker):
        await _batch(worker)
        await _until(lambda: _attempts(worker), 5, "a first try")
        first = time.monotonic()
        await asyncio.sleep(3.0)  # the window in which tries are counted
        tries = await _attempts(worker)
        elapsed = time.monotonic() - first
    # Backoff 0.3 s doubling to a 1 s cap (jittered: at least half of it): a handful of tries.
    assert 2 <= tries <= 2 + elapsed / 0.5, f"{tries} tries in {elapsed:.1f} s"


@pytest.mark.parametrize("action", ["cancel", "expire", "disable"])
async def test_waiting_items_stop_when_their_batch_or_tenant_does(  # type: ignore[no-untyped-def]
    action: str, clean_db, redis_server, tiny_models, tmp_path: Path
) -> None:
    worker = build_worker(
        _settings(redis_server, tmp_path, batch_retry_backoff_s=0.2, batch_retry_max_backoff_s=0.5)
    )
    async with full_pool(worker), running(worker):
        batch = await _batch(worker, n=2)
        await _until(lambda: _attempts(worker), 5, "a first try")
        if action == "cancel":
            await worker.batches.cancel(TENANT, batch.id)
        elif action == "expire":
            await worker.state.redis.hset(keys.batch_record(batch.id), "expires_at", int(time.time()) - 1)
        else:
            tenant = await worker.core.tenants.get_tenant(TENANT)
            await worker.core.tenants.put_tenant(tenant.model_copy(update={"disabled": True}))

        async def final() -> BatchObject | None:
            b = await worker.batches.get(TENANT, batch.id)
            return b if b.status.final else None

        done = await _until(final, 8, f"batch final after {action}")
        tries = await _attempts(worker)
        await asyncio.sleep(1.0)  # nothing tries again once the batch is final
        assert await _attempts(worker) == tries
        lines = await _error_lines(worker, batch.id)
    expected = {
        "cancel": ("cancelled", "batch_cancelled"),
        "expire": ("expired", "batch_expired"),
        "disable": ("completed", "tenant_disabled"),
    }[action]
    assert done.status.value == expected[0]
    assert sorted(line["custom_id"] for line in lines) == ["req-0", "req-1"]
    assert {line["error"]["code"] for line in lines} == {expected[1]}
    assert {line["response"]["body"]["error"]["code"] for line in lines} == {expected[1]}


async def test_an_item_delivered_n_times_is_dead_lettered_once(
    clean_db, redis_server, tiny_models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    deliveries = 3
    settings = _settings(
        redis_server, tmp_path, batch_max_deliveries=deliveries, batch_visibility_timeout_s=1.0
    )
    worker = build_worker(settings, consumer="w1")
    other = build_worker(settings, consumer="w2")
    batch = await _batch(worker)
    # The item's first N deliveries went to workers that died on it (an OOM-kill, say).
    crashed = BatchQueue(worker.state, ["text"], visibility_timeout_s=0)
    await crashed.ensure_groups()
    assert len(await crashed.read("dead-1", count=1, block_ms=100)) == 1
    for n in range(2, deliveries + 1):
        assert len(await crashed.reclaim(f"dead-{n}", count=1)) == 1
    async with running(worker), running(other):

        async def final() -> BatchObject | None:
            b = await worker.batches.get(TENANT, batch.id)
            return b if b.status.final else None

        done = await _until(final, 10, "batch final")
        lines = await _error_lines(worker, batch.id)
    assert done.status.value == "completed" and done.output_file_id is None
    assert done.request_counts.failed == 1 and done.request_counts.completed == 0
    assert [line["custom_id"] for line in lines] == ["req-0"]
    assert lines[0]["error"]["code"] == "max_deliveries_exceeded"
    assert str(deliveries) in lines[0]["error"]["message"]


async def test_a_worker_generates_in_at_most_its_share_of_a_pool(redis_server, tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """batch_pool_share leaves the rest of a pool to interactive requests (issue 12): with
    more items in flight than the share, no more than the share generate at once."""
    from services.batch.metrics import BatchMetrics
    from services.batch.worker import BatchProcessor

    settings = worker_settings(
        redis_server.url, tmp_path / "files", batch_concurrency=16, batch_pool_share=0.125
    )
    worker = build_worker(settings)
    capacity = next(p.capacity for p in worker.core.catalog.enabled_pools if p.name == "text")
    share = int(capacity * 0.125)
    assert 1 <= share < 16  # the check below is not vacuous
    running, most, gate = 0, 0, asyncio.Event()

    async def generate(tenant, item, item_id):  # type: ignore[no-untyped-def]
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == share:
            gate.set()
        await asyncio.sleep(0.05)
        running -= 1
        return {"ok": item_id}

    processor = BatchProcessor.from_settings(
        worker.core,
        worker.queue,
        worker.batches,
        BatchMetrics(),
        settings,
        consumer="share",
        generate=generate,
    )
    await add_tenant(worker, "t")
    upload = await worker.files.upload("t", filename="in.jsonl", purpose="batch", data=jsonl(40))
    batch = await worker.batches.create(
        "t", CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions")
    )
    task = asyncio.get_running_loop().create_task(processor.run())
    try:
        await asyncio.wait_for(gate.wait(), 30)
        deadline = asyncio.get_running_loop().time() + 60
        while (await worker.batches.get("t", batch.id)).status.value != "completed":
            assert asyncio.get_running_loop().time() < deadline, "the batch did not finish"
            await asyncio.sleep(0.05)
    finally:
        processor.stop()
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        await worker.state.close()
    assert most == share
