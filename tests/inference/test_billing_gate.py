"""Gateway logic of billing a request that failed (issue 9, item 5), on real Redis.

The one place with a fake: a pool that fails on demand, because a 503 or an engine error
cannot be produced at will on the real cluster. The engine refusing a request is also
covered end to end in test_billing_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import GenerationFailed, InvalidRequest, PhiserveError, ServiceUnavailable
from services.inference.generation import Caller, GenerationRunner
from services.inference.metrics import GatewayMetrics
from services.pools.engine import ChatMessage, GenerationChunk, GenerationRequest, SamplingOptions
from services.redis_store import RedisStore, keys
from services.tenancy.admission import utc_day
from services.tenancy.models import Tenant, TenantLimits
from services.tenancy.usage import UsageLedger
from tests.helpers import real_gate


class FailingPool:
    """A pool whose call fails before any output, with the given error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def generate(self, pool: Any, request: GenerationRequest) -> Any:
        await asyncio.sleep(0)
        raise self.error

    async def stream(self, pool: Any, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        await asyncio.sleep(0)
        raise self.error
        yield  # an async generator


class Shape:
    def response(self, result: Any) -> Any:
        return result

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> Any:
        return text

    def usage_chunk(self, usage: dict[str, int]) -> Any:
        return usage


def _runner(state: RedisStore, error: BaseException) -> GenerationRunner:
    metrics = GatewayMetrics()
    gate = real_gate(state, {"text": 4}, metrics)
    return GenerationRunner(FailingPool(error), gate, metrics)  # type: ignore[arg-type]


def _request() -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=50),
        messages=(ChatMessage(role="user", text="tell me a long story " * 30),),
    )


ERRORS = [
    ServiceUnavailable("no replica of pool 'text' is available", code="no_live_replica"),
    GenerationFailed("the engine failed to generate a response"),
    InvalidRequest("image 1 could not be decoded", param="messages"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
async def test_failed_request_bills_nothing_and_releases_everything(
    state: RedisStore, error: PhiserveError, stream: bool
) -> None:
    pool = load_catalog("local").enabled_pools[0]
    tenant = Tenant(
        id="victim", limits=TenantLimits(tpm=100_000, max_concurrent=4, daily_token_budget=1_000_000)
    )
    runner = _runner(state, error)
    with pytest.raises(type(error)):
        if stream:
            await runner.open_stream(Caller(tenant), pool, _request(), Shape(), include_usage=False)
        else:
            await runner.complete(Caller(tenant), pool, _request(), Shape())
    day = utc_day(time.time())
    assert await UsageLedger(state).rows([day], tenant_id="victim") == []
    # The reservation is released: nothing left in the token window, the budget or in flight.
    window = await state.redis.hgetall(keys.tokens_window("victim"))
    assert sum(int(v) for v in window.values()) == 0
    assert int(await state.redis.get(keys.daily_tokens("victim", day)) or 0) == 0
    assert await state.redis.zcard(keys.concurrency_leases("victim")) == 0
    assert await state.redis.zcard(keys.pool_in_flight("text")) == 0
