"""The gRPC server bounds its concurrent RPCs and message size (issue 9, item 4).

A real gRPC server (the gateway's `create_server`, its real servicers) on a free port,
from `build_core` on real Redis; the pool handles are stand-ins (no pool is called).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from services.batch.api import build_batch_api
from services.catalog.loader import load_catalog
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc
from services.grpc.server import GrpcServer, start_grpc_server
from services.inference.core import build_core
from services.inference.ports import BatchApis
from services.local.redis_server import LocalRedis
from services.settings import Settings
from tests.conftest import CACHE_DIR


class IdleHandle:
    """Stands in for a pool's Serve handle: answers readiness, is never asked to generate."""

    def __init__(self) -> None:
        self.ready = SimpleNamespace(remote=self._ready)

    def options(self, **_: Any) -> IdleHandle:
        return self

    async def _ready(self) -> bool:
        return True


@pytest.fixture
async def small_server(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[GrpcServer]:
    settings = Settings(
        redis_url=redis_server.url,
        admin_key=SecretStr("admin-key-for-the-grpc-limit-test"),
        cache_dir=CACHE_DIR,
        files_dir=tmp_path,
        grpc_max_concurrent_rpcs=2,
        max_request_body_bytes=64 * 1024,
    )
    catalog = load_catalog("local")
    core = build_core(settings, catalog, {p.name: IdleHandle() for p in catalog.enabled_pools})
    files, batches = build_batch_api(core, settings)
    server = await start_grpc_server(core, BatchApis(files, batches), settings, address="127.0.0.1:0")
    try:
        yield server
    finally:
        await server.stop(0)
        await core.redis.close()


async def test_rpcs_beyond_the_bound_are_refused(small_server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # Two long-lived RPCs fill the bound.
        watches = [health.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(2)]
        for watch in watches:
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for watch in watches:
            watch.cancel()

        async def check_passes() -> bool:
            try:
                await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return True

        deadline = asyncio.get_running_loop().time() + 10
        while not await check_passes():
            assert asyncio.get_running_loop().time() < deadline, "slots not given back"
            await asyncio.sleep(0.05)


async def test_a_message_over_the_body_limit_is_refused_unread(small_server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        big = pb.UploadFileRequest(filename="x.jsonl", purpose="batch", data=b"x" * (128 * 1024))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UploadFile(big, timeout=10)  # no key either: the size is refused first
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_file_and_batch_rpcs_count_against_rpm(
    small_server: GrpcServer, redis_server: LocalRedis
) -> None:
    from services.redis_store import RedisStore
    from services.tenancy.models import Tenant, TenantLimits
    from services.tenancy.store import TenantStore

    state = RedisStore(redis_server.url)
    try:
        store = TenantStore(state)
        await store.put_tenant(Tenant(id="grpc-rpm", limits=TenantLimits(rpm=2)))
        key, _ = await store.create_key("grpc-rpm", name="t")
    finally:
        await state.close()
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{small_server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.ListBatches(pb.ListBatchesRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetFile(pb.GetFileRequest(file_id="file-none"), metadata=metadata, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # counted, then answered
        for call in (
            stub.ListBatches(pb.ListBatchesRequest(), metadata=metadata, timeout=10),
            stub.GetFile(pb.GetFileRequest(file_id="file-none"), metadata=metadata, timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "requests per minute" in (info.value.details() or "")
