"""The tenant gate in-process (issue 10, item 6): admission, the fair queue and the release
of leases and slots however a request ends, on the real core (`build_core`) and a real
redis-server, with fake engines behind real pool replicas. No Ray; seconds.

The text pool gets ONE slot (`max_in_flight: 1`), so who waits and who runs is decided by
the fair queue alone, and a paused engine holds the slot as long as a test needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.catalog.loader import load_catalog
from services.errors import GenerationFailed, Overloaded, RateLimited
from services.inference.errors import error_payload
from services.inference.generation import Caller
from services.local.redis_server import LocalRedis
from services.tenancy.models import Tenant, TenantLimits
from tests.conftest import inprocess_redis_url
from tests.fakes.core import PlainShape, billed, chat_request, queue_depth, until, with_slots
from tests.fakes.engine import fake_tokens
from tests.fakes.gateway import InProcessGateway, run_inprocess_gateway

QUEUE_TIMEOUT_S = 2.0
CALL_BOUND_S = 20.0
ONE = Tenant(id="solo", limits=TenantLimits(max_concurrent=1))
HEAVY = Tenant(id="heavy")
# What the fake engine reports for `chat_request()` ("one two three" -> " one two three").
PROMPT_TOKENS = len(fake_tokens("<|user|>\none two three<|end|>\n<|assistant|>\n"))
COMPLETION_TOKENS = 3
LIGHT = Tenant(id="light")


@pytest.fixture
async def gw(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    catalog = with_slots(load_catalog("local"), "text", 1)
    async with run_inprocess_gateway(
        inprocess_redis_url(redis_server), tmp_path, catalog=catalog, queue_timeout_s=QUEUE_TIMEOUT_S
    ) as gateway:
        for tenant in (ONE, HEAVY, LIGHT):
            await gateway.add_tenant(tenant)
        yield gateway


def _complete(
    gw: InProcessGateway, tenant: Tenant, request_id: str = "req", *, model: str = "phi-3.5-mini"
) -> asyncio.Future[object]:
    """One generation, as a task; bounded, so a request stuck by a bug fails the test."""
    pool = gw.core.router.resolve(model)
    request = chat_request(request_id=request_id, model=model)
    return asyncio.ensure_future(
        asyncio.wait_for(gw.core.runner.complete(Caller(tenant), pool, request, PlainShape()), CALL_BOUND_S)
    )


async def test_a_full_pool_queues_requests_and_grants_them_fairly_between_tenants(
    gw: InProcessGateway,
) -> None:
    engine = gw.engine("phi-3.5-mini")
    engine.pause()
    calls = [_complete(gw, HEAVY, "heavy-1")]
    await until(lambda: engine.running == 1, what="heavy-1 holding the slot")
    for waiting, request_id in enumerate(("heavy-2", "heavy-3"), start=1):
        calls.append(_complete(gw, HEAVY, request_id))
        # One at a time: the order they join the queue is the order of their virtual starts.
        await until(lambda n=waiting: _depth_is(gw, (1, n)), what=f"{request_id} waiting")  # type: ignore[misc]
    calls.append(_complete(gw, LIGHT, "light-1"))
    await until(lambda: _depth_is(gw, (1, 3)), what="the light request waiting")
    assert [r.request_id for r in engine.requests] == ["heavy-1"]  # nobody passed the queue

    engine.resume()
    await asyncio.wait_for(asyncio.gather(*calls), 10)
    # The light tenant's first request goes before the heavy tenant's backlog (fair queueing).
    assert [r.request_id for r in engine.requests] == ["heavy-1", "light-1", "heavy-2", "heavy-3"]
    assert await queue_depth(gw.core, "text") == (0, 0)


async def test_waiting_past_the_queue_timeout_is_429_and_holds_nothing(gw: InProcessGateway) -> None:
    engine = gw.engine("phi-3.5-mini")
    engine.pause()
    holder = _complete(gw, HEAVY, "holder")
    await until(lambda: engine.running == 1, what="the slot held")
    with pytest.raises(Overloaded) as caught:
        await _complete(gw, ONE, "too-late")
    status, body, headers = error_payload(caught.value)
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "overloaded", "5")
    assert await queue_depth(gw.core, "text") == (1, 0)  # its ticket is gone
    engine.resume()
    await holder
    # Its concurrency lease was released too: the tenant's one slot is free.
    await _complete(gw, ONE, "next")
    assert await billed(gw.core, ONE.id) == (1, PROMPT_TOKENS, COMPLETION_TOKENS)


async def test_a_tenant_at_its_concurrency_limit_is_refused_at_once(gw: InProcessGateway) -> None:
    engine = gw.engine("phi-3.5-moe")  # a pool with free slots: only the tenant's limit refuses
    engine.pause()
    first = _complete(gw, ONE, model="phi-3.5-moe")
    await until(lambda: engine.running == 1, what="the first request running")
    with pytest.raises(RateLimited) as caught:
        await _complete(gw, ONE, model="phi-3.5-moe")
    assert caught.value.param == "concurrency"
    assert error_payload(caught.value)[0] == 429
    assert "Retry-After" in error_payload(caught.value)[2]
    assert len(engine.requests) == 1
    engine.resume()
    await first


@pytest.mark.parametrize("ending", ["success", "engine_failure", "client_cancel"])
async def test_leases_and_slots_are_released_however_the_request_ends(
    gw: InProcessGateway, ending: str
) -> None:
    engine = gw.engine("phi-3.5-mini")
    if ending == "engine_failure":
        engine.fail_after_tokens = 0
    if ending == "client_cancel":
        engine.pause()
    call = _complete(gw, ONE, ending)
    if ending == "success":
        await call
    elif ending == "engine_failure":
        with pytest.raises(GenerationFailed):
            await call
    else:
        await until(lambda: engine.running == 1, what="the request running")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: engine.aborted, what="the engine request aborted")
    await until(lambda: _depth_is(gw, (0, 0)), what="the pool slot released")
    assert gw.core.keeper._active == {}  # nothing left for the keeper to renew

    # The tenant's one concurrency lease is free: the next request runs at once.
    engine.fail_after_tokens = None
    engine.resume()
    await asyncio.wait_for(_complete(gw, ONE, "after"), 5)
    requests, prompt, completion = await billed(gw.core, ONE.id)
    if ending == "success":
        assert (requests, prompt, completion) == (2, 2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS)
    elif ending == "engine_failure":  # our failure: nothing billed
        assert (requests, prompt, completion) == (1, PROMPT_TOKENS, COMPLETION_TOKENS)
    else:  # the client left: it pays for the prompt it sent (as the gateway counted it)
        assert (requests, completion) == (2, COMPLETION_TOKENS) and prompt > PROMPT_TOKENS


async def _depth_is(gw: InProcessGateway, expected: tuple[int, int]) -> bool:
    return await queue_depth(gw.core, "text") == expected
