"""A stream that is opened but never iterated still settles (issue 9, item 3).

`open_stream` admits the request (a concurrency lease, a fair-queue slot, a running engine
request) and returns the stream before its first chunk is sent. A client that leaves in
that gap (cancelled between gRPC `send_headers` and the first write, or before the SSE body
starts) used to leave the lease and the slot held, and renewed, for as long as the gateway
lived. Real gate on real Redis; the one fake is the pool, which streams on demand.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.grpc.servicer import InferenceServicer, _Call
from services.inference.gate import LeaseKeeper
from services.inference.generation import Caller, GenerationRunner
from services.inference.metrics import GatewayMetrics
from services.inference.ports import BatchApis
from services.pools.engine import ChatMessage, GenerationChunk, GenerationRequest, SamplingOptions
from services.redis_store import RedisStore, keys
from services.tenancy.models import Tenant, TenantLimits
from tests.helpers import real_gate

TENANT = Tenant(id="leaver", limits=TenantLimits(max_concurrent=1))


class EndlessPool:
    """Streams until closed; counts the engine requests that were closed (aborted)."""

    def __init__(self) -> None:
        self.closed = 0

    async def stream(self, pool: Any, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        n = 0
        try:
            while True:
                n += 1
                yield GenerationChunk(text="x", completion_tokens=n, prompt_tokens=5)
                await asyncio.sleep(0.01)
        finally:
            self.closed += 1


class Shape:
    def response(self, result: Any) -> Any:
        return result

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> Any:
        return text

    def usage_chunk(self, usage: dict[str, Any]) -> Any:
        return usage


def _runner(state: RedisStore) -> tuple[GenerationRunner, EndlessPool, LeaseKeeper]:
    metrics = GatewayMetrics()
    gate = real_gate(state, {"text": 4}, metrics)
    keeper = gate._keeper
    pool = EndlessPool()
    return GenerationRunner(pool, gate, metrics), pool, keeper  # type: ignore[arg-type]


def _request() -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=50),
        messages=(ChatMessage(role="user", text="hello"),),
    )


async def _held(state: RedisStore) -> tuple[int, int]:
    return (
        int(await state.redis.zcard(keys.concurrency_leases(TENANT.id))),
        int(await state.redis.zcard(keys.pool_in_flight("text"))),
    )


async def _until_released(state: RedisStore, pool: EndlessPool, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await _held(state) != (0, 0) or pool.closed != 1:
        assert time.monotonic() < deadline, f"still held: {await _held(state)}, engine closed {pool.closed}"
        await asyncio.sleep(0.02)


async def test_unstarted_stream_closed_releases_everything(state: RedisStore) -> None:
    runner, pool, keeper = _runner(state)
    text = load_catalog("local").enabled_pools[0]
    stream, _ = await runner.open_stream(Caller(TENANT), text, _request(), Shape(), include_usage=False)
    assert await _held(state) == (1, 1)
    await stream.aclose()  # type: ignore[attr-defined]
    await _until_released(state, pool)
    assert not keeper._active  # nothing left for the keeper to renew
    # The tenant's one concurrency slot is usable again.
    again, _ = await runner.open_stream(Caller(TENANT), text, _request(), Shape(), include_usage=False)
    await again.aclose()  # type: ignore[attr-defined]


async def test_unstarted_stream_dropped_releases_everything(state: RedisStore) -> None:
    runner, pool, keeper = _runner(state)
    text = load_catalog("local").enabled_pools[0]
    stream, _ = await runner.open_stream(Caller(TENANT), text, _request(), Shape(), include_usage=False)
    assert await _held(state) == (1, 1)
    del stream
    gc.collect()
    await _until_released(state, pool)
    assert not keeper._active


class _CancelledContext:
    """A gRPC context whose client is gone when the initial metadata is sent."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def send_initial_metadata(self, metadata: Any) -> None:
        raise asyncio.CancelledError

    async def write(self, message: Any) -> None:
        raise AssertionError("nothing is written after the cancel")


async def test_grpc_stream_cancelled_at_send_headers_releases_everything(state: RedisStore) -> None:
    runner, pool, keeper = _runner(state)
    text = load_catalog("local").enabled_pools[0]

    core = SimpleNamespace(runner=runner, metrics=GatewayMetrics())
    servicer = InferenceServicer(core, BatchApis(files=None, batches=None))  # type: ignore[arg-type]
    call = _Call(_CancelledContext(), "ChatStream")  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        chunks, headers = await runner.open_stream(
            Caller(TENANT), text, _request(), Shape(), include_usage=False
        )
        await servicer._send_stream(call, chunks, headers, lambda chunk, request_id: chunk)
    await _until_released(state, pool)
    assert not keeper._active
