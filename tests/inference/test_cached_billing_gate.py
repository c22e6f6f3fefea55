"""The gate settles with the engine's cached prompt tokens (issue 13, item 3), on real Redis.

A pool stand-in reports fixed counts, so each price is known: the daily budget charges a
cached prompt token at the pool's cached_prompt_billing_factor, the fair queue's virtual
finish at its cached_prompt_queue_factor times its cost_factor, unary and streamed alike.
What a pool reports beyond the prompt (or below zero) never makes a request cheaper.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.catalog.models import PoolConfig
from services.inference.generation import Caller, GenerationRunner
from services.inference.metrics import GatewayMetrics
from services.pools.engine import (
    ChatMessage,
    ChoiceResult,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)
from services.redis_store import RedisStore, keys
from services.tenancy.admission import utc_day
from services.tenancy.models import Tenant, TenantLimits
from services.tenancy.usage import UsageLedger
from tests.helpers import real_gate

PROMPT, COMPLETION = 500, 20


class ReportingPool:
    """A pool whose engine reports these counts, unary or as a two-chunk stream."""

    def __init__(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens

    async def generate(self, pool: Any, request: GenerationRequest) -> GenerationResult:
        await asyncio.sleep(0)
        choice = ChoiceResult(0, "words", "length")
        return GenerationResult([choice], PROMPT, COMPLETION, self.cached_tokens)

    async def stream(self, pool: Any, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        await asyncio.sleep(0)
        yield GenerationChunk("w", 1, PROMPT, None, self.cached_tokens)
        yield GenerationChunk("ords", COMPLETION, PROMPT, "length", self.cached_tokens)


class Pieces:
    def response(self, result: Any) -> Any:
        return result

    def chunk(self, piece: Any, totals: Any = None) -> Any:
        return piece

    def usage_chunk(self, usage: Any) -> Any:
        return usage


def _request() -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        model="phi-3.5-moe",
        sampling=SamplingOptions(max_tokens=COMPLETION),
        messages=(ChatMessage(role="user", text="the same long system prompt " * 20),),
    )


def _pool(name: str) -> PoolConfig:
    return next(p for p in load_catalog("local").enabled_pools if p.name == name)


async def _run(state: RedisStore, pool: PoolConfig, tenant: Tenant, cached: int, *, stream: bool) -> None:
    metrics = GatewayMetrics()
    runner = GenerationRunner(ReportingPool(cached), real_gate(state, {pool.name: 4}, metrics), metrics)  # type: ignore[arg-type]
    if stream:
        chunks, _ = await runner.open_stream(Caller(tenant), pool, _request(), Pieces(), include_usage=False)
        assert [c.text async for c in chunks] == ["w", "ords"]
    else:
        result, _ = await runner.complete(Caller(tenant), pool, _request(), Pieces())
        assert result.cached_tokens == cached


async def _charged(state: RedisStore, pool: PoolConfig, tenant_id: str) -> tuple[int, float]:
    """(the daily budget spent, the tenant's virtual finish in the pool's queue)."""
    spent = int(await state.redis.get(keys.daily_tokens(tenant_id, utc_day(time.time()))) or 0)
    finish = float(await state.redis.hget(keys.pool_virtual_time(pool.name), f"t:{tenant_id}") or 0)
    return spent, finish


def _tenant() -> Tenant:
    return Tenant(id="acme", weight=2, limits=TenantLimits(tpm=100_000, daily_token_budget=1_000_000))


@pytest.mark.parametrize("stream", [False, True])
async def test_cached_prompt_tokens_are_charged_at_the_pools_factors(state: RedisStore, stream: bool) -> None:
    moe = _pool("moe")  # cost_factor 2.5, billing factor 0.5, queue factor 0.1
    assert (moe.cost_factor, moe.cached_prompt_billing_factor, moe.cached_prompt_queue_factor) == (
        2.5,
        0.5,
        0.1,
    )
    await _run(state, moe, _tenant(), 384, stream=stream)
    spent, finish = await _charged(state, moe, "acme")
    assert spent == PROMPT + COMPLETION - 384 // 2  # 192 of the cached 384 are charged
    # A fresh queue (virtual time 0): the finish is the actual cost / weight 2.
    assert finish == pytest.approx((PROMPT - 384 + COMPLETION + 384 * 0.1) * 2.5 / 2)
    (row,) = await UsageLedger(state).rows([utc_day(time.time())], tenant_id="acme")
    assert (row.model, row.prompt_tokens, row.cached_prompt_tokens, row.uncached_prompt_tokens) == (
        "phi-3.5-moe",
        PROMPT,
        384,
        PROMPT - 384,
    )
    assert row.billed_tokens == spent
    # Everything released: nothing in flight in the queue, no concurrency lease.
    assert await state.redis.zcard(keys.pool_in_flight("moe")) == 0
    assert await state.redis.zcard(keys.concurrency_leases("acme")) == 0


@pytest.mark.parametrize(("reported", "counted"), [(10_000, PROMPT), (-50, 0)])
async def test_a_cached_count_beyond_the_prompt_never_makes_a_request_cheaper(
    state: RedisStore, reported: int, counted: int
) -> None:
    """Attacker's side: whatever a pool reports (a bug, a replica under someone's control),
    the discount stops at the whole prompt, and a negative count is no surcharge either."""
    text = _pool("text")
    await _run(state, text, _tenant(), reported, stream=False)
    spent, finish = await _charged(state, text, "acme")
    assert spent == PROMPT + COMPLETION - (counted - -(-counted // 2))
    assert finish == pytest.approx((PROMPT - counted + COMPLETION + counted * 0.1) / 2)
    (row,) = await UsageLedger(state).rows([utc_day(time.time())], tenant_id="acme")
    assert row.cached_prompt_tokens == counted
    assert spent >= COMPLETION + PROMPT // 2  # never below the factor's share of the prompt
