"""Redis memory is a shared resource (issue 9, item 2): one tenant must not be able to fill it.

On real Redis with the core `build_core` wires: per-tenant quotas on unfinished
batches, their queued items, stored files and bytes (429 quota_exceeded, 400 when the
request alone can never fit); bounded metadata; a batch's results leave Redis once its
files are written and its record expires after the retention; items enqueued in chunks
(no giant MULTI), never visible to workers before the batch is ready, and a create that
fails mid-way leaves nothing behind; an upload that fails mid-write leaves no temp file.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.errors import InvalidRequest, PhiserveError, RateLimited, ServiceUnavailable
from services.inference.errors import error_payload, invalid_request_from
from services.inference.protocol.batches import BatchStatus, CreateBatchRequest
from services.redis_store import keys
from tests.batch.harness import Worker, add_tenant, build_worker, full_pool, jsonl, running, worker_settings
from tests.conftest import UNIT_DB, free_port


def _worker(redis_server, tmp_path: Path, **overrides) -> Worker:  # type: ignore[no-untyped-def]
    return build_worker(
        worker_settings(f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}", tmp_path / "files", **overrides)
    )


async def _create(worker: Worker, tenant: str, n: int, **extra):  # type: ignore[no-untyped-def]
    upload = await worker.files.upload(tenant, filename="in.jsonl", purpose="batch", data=jsonl(n))
    return await worker.batches.create(
        tenant, CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions", **extra)
    )


def _status(exc: PhiserveError) -> tuple[int, str | None]:
    status, body, _ = error_payload(exc)
    return status, body["error"]["code"]


async def test_a_tenant_creating_batches_in_a_loop_hits_its_quota_and_another_still_creates(  # type: ignore[no-untyped-def]
    state, redis_server, tiny_models, tmp_path: Path
) -> None:
    worker = _worker(redis_server, tmp_path, tenant_max_active_batches=3, tenant_max_queued_items=1000)
    await add_tenant(worker, "greedy")
    await add_tenant(worker, "polite")
    upload = await worker.files.upload("greedy", filename="in.jsonl", purpose="batch", data=jsonl(200))
    request = CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions")
    accepted = 0
    with pytest.raises(RateLimited) as info:
        for _ in range(25):  # the loop: 25 batches of the same file
            await worker.batches.create("greedy", request)
            accepted += 1
    assert accepted == 3
    assert _status(info.value) == (429, "quota_exceeded")
    assert "3 of 3" in info.value.message
    from services.grpc.errors import grpc_status

    assert grpc_status(info.value)[0].name == "RESOURCE_EXHAUSTED"  # the gRPC CreateBatch answer
    assert await worker.state.redis.xlen(keys.batch_stream("text")) == 600  # nothing of the 4th
    # Another tenant is not affected.
    other = await _create(worker, "polite", 5)
    assert other.status is BatchStatus.in_progress
    # Items count too: 3 x 200 queued; a quota of 1000 leaves room for 400, not 500.
    worker2 = _worker(redis_server, tmp_path, tenant_max_active_batches=10, tenant_max_queued_items=1000)
    await _create(worker2, "greedy", 400)
    with pytest.raises(RateLimited, match="1000"):
        await _create(worker2, "greedy", 1)
    # A batch larger than the whole quota can never fit: 400, not 429.
    with pytest.raises(InvalidRequest) as too_big:
        await _create(worker2, "polite", 1001)
    assert _status(too_big.value)[0] == 400
    await worker.state.close()
    await worker2.state.close()


async def test_file_quotas_count_files_and_bytes(state, redis_server, tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = jsonl(10)
    worker = _worker(redis_server, tmp_path, tenant_max_files=2, tenant_max_file_bytes=len(data) * 3)
    await add_tenant(worker, "hoarder")
    first = await worker.files.upload("hoarder", filename="a.jsonl", purpose="batch", data=data)
    await worker.files.upload("hoarder", filename="b.jsonl", purpose="batch", data=data)
    with pytest.raises(RateLimited) as info:
        await worker.files.upload("hoarder", filename="c.jsonl", purpose="batch", data=data)
    assert _status(info.value) == (429, "quota_exceeded") and "2 of 2 files" in info.value.message
    await worker.files.delete("hoarder", first.id)  # deleting frees the slot
    await worker.files.upload("hoarder", filename="c.jsonl", purpose="batch", data=data)
    # Bytes: two files of 2 x len stored, a third would pass 3 x len.
    await worker.files.delete("hoarder", (await worker.files.list("hoarder", limit=1))[0][0].id)
    with pytest.raises(RateLimited, match="bytes"):
        await worker.files.upload("hoarder", filename="d.jsonl", purpose="batch", data=jsonl(25))
    await worker.state.close()


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
    ],
    ids=["17-keys", "65-char-key", "513-char-value"],
)
def test_oversized_metadata_is_a_400(metadata: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as info:
        CreateBatchRequest(input_file_id="file-x", endpoint="/v1/completions", metadata=metadata)
    error = invalid_request_from(info.value.errors())
    assert _status(error)[0] == 400 and error.param == "metadata"
    # gRPC's CreateBatch validates with the same model: INVALID_ARGUMENT naming the field.
    import grpc

    from services.grpc import convert
    from services.grpc.errors import grpc_status
    from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb

    with pytest.raises(InvalidRequest) as refused:
        convert.create_batch_body(
            pb.CreateBatchRequest(input_file_id="f", endpoint="/v1/completions", metadata=metadata)
        )
    assert (
        grpc_status(refused.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
        and refused.value.param == "metadata"
    )
    # The largest allowed metadata passes.
    CreateBatchRequest(
        input_file_id="f", endpoint="/v1/completions", metadata={f"{i:064d}": "v" * 512 for i in range(16)}
    )


async def test_results_leave_redis_once_the_files_are_written(
    state, redis_server, tiny_models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(redis_server, tmp_path, batch_retention_s=3600)
    await add_tenant(worker, "t")
    batch = await _create(worker, "t", 3)
    queue = worker.queue
    await queue.ensure_groups()
    items = await queue.read("w", count=10, block_ms=100)
    assert len(items) == 3
    for item in items:
        ok = item.line != 2
        line = {"id": f"{batch.id}-{item.line}", "custom_id": item.custom_id, "answer": item.line}
        new, completed, failed, total = await queue.record(item, {"ok": ok, "line": line}, ok=ok)
        if completed + failed >= total:
            await worker.batches.finalize(batch.id)
    done = await worker.batches.get("t", batch.id)
    assert done.status is BatchStatus.completed
    assert await worker.state.redis.exists(keys.batch_results(batch.id)) == 0
    out = (await worker.files.content("t", done.output_file_id)).decode().split("\n")
    err = (await worker.files.content("t", done.error_file_id)).decode().split("\n")
    assert [json.loads(x)["custom_id"] for x in out if x] == ["req-0", "req-2"]
    assert [json.loads(x)["answer"] for x in out if x] == [1, 3]
    assert [json.loads(x)["custom_id"] for x in err if x] == ["req-1"]
    # The finished batch's record expires after the retention; the tenant's quota is free.
    assert 0 < await worker.state.redis.ttl(keys.batch_record(batch.id)) <= 3600
    assert await worker.state.redis.hlen(keys.tenant_active_batches("t")) == 0
    # A late duplicate (a redelivered item) does not bring the results back.
    new, completed, failed, total = await queue.record(items[0], {"ok": True, "line": {}}, ok=True)
    assert not new and (completed, failed) == (2, 1)
    assert await worker.state.redis.exists(keys.batch_results(batch.id)) == 0
    await worker.state.close()


async def test_items_are_enqueued_in_chunks(state, redis_server, tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(redis_server, tmp_path, batch_enqueue_chunk=100)
    await add_tenant(worker, "t")
    upload = await worker.files.upload("t", filename="in.jsonl", purpose="batch", data=jsonl(350))
    commands: list[str] = []
    async with worker.state.redis.monitor() as monitor:

        async def collect() -> None:
            async for event in monitor.listen():
                commands.append(event["command"].split(" ")[0].upper())
                if event["command"] == "ECHO chunk-test-end":
                    return

        collector = asyncio.ensure_future(collect())
        await worker.batches.create(
            "t", CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions")
        )
        await worker.state.redis.echo("chunk-test-end")
        await asyncio.wait_for(collector, 10)
    # Each chunk is one atomic script call (enqueue_items.lua): MONITOR shows the EVALSHA,
    # then the XADDs the script ran.
    chunks: list[int] = []
    for command in commands:
        if command == "EVALSHA":
            chunks.append(0)
        elif command == "XADD":
            assert chunks, "an XADD outside a script call"
            chunks[-1] += 1
    assert [n for n in chunks if n] == [100, 100, 100, 50], chunks  # other scripts add none
    await worker.state.close()


async def test_workers_do_not_run_items_of_a_batch_still_being_enqueued(  # type: ignore[no-untyped-def]
    state, redis_server, tiny_models, tmp_path: Path
) -> None:
    worker = _worker(redis_server, tmp_path)
    await add_tenant(worker, "t")
    batch = await _create(worker, "t", 2)
    # As if the create were still adding chunks: the record does not say ready yet.
    await worker.state.redis.hset(keys.batch_record(batch.id), "status", "validating")

    async def tries() -> int:
        return sum(int(v) for v in (await worker.state.redis.hgetall(keys.requests_window("t"))).values())

    async with full_pool(worker), running(worker):
        for _ in range(10):  # a second of the worker's turns: the items wait, untried
            await asyncio.sleep(0.1)
            assert await tries() == 0
        await worker.state.redis.hset(keys.batch_record(batch.id), "status", "in_progress")
        for _ in range(50):
            if await tries() > 0:
                break
            await asyncio.sleep(0.1)
        assert await tries() > 0


async def test_a_create_that_fails_mid_way_leaves_nothing(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from services.local.redis_server import LocalRedis

    server = LocalRedis(port=free_port(), directory=tmp_path / "redis")
    server.start(appendonly=False)
    try:
        worker = build_worker(worker_settings(server.url, tmp_path / "files", batch_enqueue_chunk=50))
        await add_tenant(worker, "t")
        upload = await worker.files.upload("t", filename="in.jsonl", purpose="batch", data=jsonl(3000))
        await worker.queue.ensure_groups()
        used = int((await worker.state.redis.info("memory"))["used_memory"])
        # Redis refuses writes (maxmemory, noeviction) part of the way through the items.
        await worker.state.redis.config_set("maxmemory", used + 300_000)
        with pytest.raises(ServiceUnavailable):
            await worker.batches.create(
                "t", CreateBatchRequest(input_file_id=upload.id, endpoint="/v1/completions")
            )
        await worker.state.redis.config_set("maxmemory", 0)
        assert await worker.state.redis.xlen(keys.batch_stream("text")) == 0
        assert await worker.state.redis.zcard(keys.tenant_batches("t")) == 0
        assert await worker.state.redis.hlen(keys.tenant_active_batches("t")) == 0
        assert await worker.state.redis.scard(keys.ACTIVE_BATCHES) == 0
        assert await worker.state.redis.keys(keys.batch_record("*")) == []
        await worker.state.close()
    finally:
        server.stop()


async def test_an_upload_that_fails_mid_write_leaves_no_temp_file(
    state, redis_server, tiny_models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(redis_server, tmp_path)
    await add_tenant(worker, "t")
    data = jsonl(2000)
    # The disk "fills" part of the way through the write: the kernel refuses bytes past 64 KiB.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ServiceUnavailable):
            await worker.files.upload("t", filename="in.jsonl", purpose="batch", data=data)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    files_dir = tmp_path / "files"
    assert [p.name for p in files_dir.rglob("*") if p.is_file()] == []
    assert await worker.files.list("t", limit=10) == ([], False)
    assert await worker.state.redis.hlen(keys.tenant_file_bytes("t")) == 0
    await worker.state.close()
